"""The ASGI response of one speech request: streamed audio bytes, SSE events, or one whole file.

The status line waits for the request's first event. So a request that fails at admission (its context does not
fit the window, say) still gets a proper 4xx, and the first audio bytes leave with the headers, as soon as the
engine has decoded the first chunk. Meanwhile a task watches the connection: a client that goes away interrupts
the wait and aborts the request (its row is freed at the engine's next step).

After a 200 has gone out, a failure can no longer change the status: an audio stream is then cut without its
final chunk (the client sees an incomplete body, not a short file that looks whole), and an SSE stream ends with
an `error` event.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time

from starlette.responses import Response

from seseme_cli.errors import InputError
from seseme_cli.server.encoding import make_encoder
from seseme_cli.server.errors import ApiError

log = logging.getLogger("seseme")


def _end_error(handle, status: str, retry_after: int) -> ApiError:
    """The error a request that ended without finishing answers with."""
    if status == "aborted":  # by the server (a client that went away gets no answer)
        return ApiError(503, "the request was aborted: the server is shutting down", "server_error",
                        code="shutting_down", headers={"Retry-After": str(retry_after)})
    message = handle.error or "the request failed"
    if isinstance(handle.exception, InputError):  # the request's own input, found at admission (e.g. too long)
        return ApiError(400, message)
    return ApiError(500, message, "server_error", code="engine_error")


def _codes_digest(codes) -> str:
    """sha256 of the generated Mimi codes (frames x 32, int64 little-endian): equal digests = the same speech,
    whatever the decoder's chunking did to the last bit of the samples."""
    if codes is None:
        return ""
    return hashlib.sha256(codes.contiguous().numpy().astype("<i8", copy=False).tobytes()).hexdigest()


class SpeechResponse(Response):
    def __init__(self, stream, plan, service, metrics, received: float):
        self.stream, self.plan, self.service, self.metrics = stream, plan, service, metrics
        self.received = received
        self.background = None  # FastAPI attaches background tasks here
        self.status_code = 200
        self.done = False

    # --- ASGI -----------------------------------------------------------------------------------------------

    async def __call__(self, scope, receive, send) -> None:
        watcher = asyncio.create_task(self._watch(receive))
        outcome = "failed"
        try:
            outcome = await self._respond(send)
        except OSError:  # the client went away while we were sending
            outcome = "cancelled"
        finally:
            self.done = True
            watcher.cancel()
            self.stream.close()
            self.metrics.outcome(outcome)
            self.metrics.duration.observe(time.perf_counter() - self.received)

    def _end_error(self, status: str) -> ApiError:
        return _end_error(self.stream.handle, status, self.service.settings.unavailable_retry_after_s)

    async def _watch(self, receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self.done:
                    self.stream.interrupt("the client went away")
                return

    # --- one request ------------------------------------------------------------------------------------------

    async def _respond(self, send) -> str:
        kind, value = await self.stream.next()
        if kind == "gone":
            return "cancelled"
        handle = self.stream.handle
        if handle.started is not None:
            self.metrics.queue_wait.observe(max(0.0, handle.started - handle.created))
        if kind == "end" and value != "finished":
            error = self._end_error(value)
            await self._send_json(send, error.status, error.body(), error.headers)
            return "aborted" if value == "aborted" else "failed"
        if kind == "audio":
            self.metrics.ttfa.observe(time.perf_counter() - self.received)
        first = (kind, value)
        if self.plan.sse:
            return await self._sse(send, first)
        if self.plan.stream:
            return await self._audio_stream(send, first)
        return await self._whole(send, first)

    def _headers(self, extra: dict[str, str]) -> list[tuple[bytes, bytes]]:
        plan = self.plan
        headers = {"content-type": plan.media_type, "x-request-id": plan.request_id,
                   "x-seseme-seed": str(plan.request.sampling.seed), "x-seseme-sample-rate": str(self.service.sample_rate)}
        if plan.ignored:
            headers["x-seseme-ignored"] = ", ".join(plan.ignored)
        if plan.stream:  # no caching, and no proxy buffering (nginx) between the engine and the listener
            headers.update({"cache-control": "no-cache", "x-accel-buffering": "no"})
        headers.update(extra)
        return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    async def _encode(self, encoder, method, *args) -> bytes:
        call = getattr(encoder, method)
        return call(*args) if encoder.inline else await asyncio.to_thread(call, *args)

    async def _encoded(self, encoder, first):
        """The request's events, encoded: ("audio", bytes) per audio chunk, then one last item: ("finished", the
        encoder's tail bytes), ("aborted" or "failed", the end status) or ("cancelled", None: the client left)."""
        event = first
        while True:
            kind, value = event
            if kind == "audio":
                yield "audio", await self._encode(encoder, "write", value)
            elif kind == "end" and value == "finished":
                yield "finished", await self._encode(encoder, "finish")
                return
            elif kind == "end":
                yield ("aborted" if value == "aborted" else "failed"), value
                return
            else:
                yield "cancelled", None
                return
            event = await self.stream.next()  # only audio gets here

    async def _audio_stream(self, send, first) -> str:
        encoder = make_encoder(self.plan.format, self.service.sample_rate, streaming=True)
        await send({"type": "http.response.start", "status": 200, "headers": self._headers({})})
        try:
            async for kind, data in self._encoded(encoder, first):
                if kind == "audio" and data:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                elif kind == "finished":
                    await send({"type": "http.response.body", "body": data, "more_body": False})
                elif kind in ("aborted", "failed"):  # cut the stream: no final chunk, so the client knows
                    log.warning("request %s %s mid-stream: %s", self.plan.request_id, data,
                                self.stream.handle.error or data)
                if kind != "audio":
                    return kind
        finally:
            encoder.close()

    async def _whole(self, send, first) -> str:
        encoder = make_encoder(self.plan.format, self.service.sample_rate, streaming=False)
        pieces = []
        try:
            async for kind, data in self._encoded(encoder, first):
                if kind in ("audio", "finished"):
                    pieces.append(data)
                elif kind in ("aborted", "failed"):
                    error = self._end_error(data)
                    await self._send_json(send, error.status, error.body(), error.headers)
                if kind not in ("audio", "finished"):
                    return kind
        finally:
            encoder.close()
        body = b"".join(pieces)
        handle = self.stream.handle
        headers = self._headers({"content-length": str(len(body)), "x-seseme-frames": str(handle.frames),
                                 "x-seseme-codes-sha256": _codes_digest(handle.codes)})
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return "finished"

    async def _sse(self, send, first) -> str:
        """OpenAI's speech events: `speech.audio.delta` (base64 audio in the response format, in order: joined, they
        make the file) ... then `speech.audio.done` with token usage (input: text tokens, output: audio frames)."""
        encoder = make_encoder(self.plan.format, self.service.sample_rate, streaming=True)
        await send({"type": "http.response.start", "status": 200, "headers": self._headers({})})

        async def event(payload: dict, more: bool = True) -> None:
            data = b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
            await send({"type": "http.response.body", "body": data, "more_body": more})

        try:
            async for kind, data in self._encoded(encoder, first):
                if kind in ("audio", "finished") and data:
                    await event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})
                if kind == "finished":
                    tokens = self.service.count_tokens(self.plan.request.text)
                    frames = self.stream.handle.frames
                    usage = {"input_tokens": tokens, "output_tokens": frames, "total_tokens": tokens + frames}
                    await event({"type": "speech.audio.done", "usage": usage}, more=False)
                elif kind in ("aborted", "failed"):
                    error = self._end_error(data)
                    await event({"type": "error", **error.body()}, more=False)
                if kind != "audio":
                    return kind
        finally:
            encoder.close()

    @staticmethod
    async def _send_json(send, status: int, body: dict, headers: dict[str, str]) -> None:
        data = json.dumps(body).encode()
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": data, "more_body": False})

