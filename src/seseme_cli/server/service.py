"""The speech service: one SpeechEngine driven by one engine thread, and the door HTTP requests come in through.

The engine thread loads the model, builds the engine (caches and CUDA graphs for max_batch rows), speaks one
short warm-up request, and only then is the service ready; meanwhile the HTTP server is already up and /health
answers 503. Then it runs `run_forever`. The HTTP side (asyncio) calls only `submit` (which `add_request`s with an
`on_event` that posts each event for the request's asyncio queue to an EventMailbox) and `abort`: it never touches
the model or the GPU.

States: loading -> ready -> draining (SIGTERM: new requests get 503, in-flight ones finish) -> stopped; or
failed (the model did not load, or the engine kept failing).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import sys
import threading
import time

import torch
from prometheus_client import Histogram

from seseme_cli.engine.collector import freeze_after_setup
from seseme_cli.engine.loop import QueueFull
from seseme_cli.errors import SesemeError
from seseme_cli.server.errors import queue_full, unavailable
from seseme_cli.server.settings import ServerSettings
from seseme_cli.server.voices import VoiceBook, codec_id
from seseme_cli.speech.request import FRAME_MS, SpeechRequest

log = logging.getLogger("seseme")

LOADING, READY, DRAINING, STOPPED, FAILED = "loading", "ready", "draining", "stopped", "failed"
MAX_CONSECUTIVE_FAILURES = 3  # engine steps failing in a row before the service gives up (health turns 503)
RATE_WINDOW_S = 10.0  # frames/s and real-time factor are measured over this much recent time
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0)  # seconds


class EventMailbox:
    """Events from the engine's threads to asyncio queues, with one wake-up of the event loop per burst. An audio
    round hands pieces to many requests at once (~80 per step at 512 streams); one `call_soon_threadsafe` per piece
    is a self-pipe write and a GIL hand-over each (512 of them took 2-4 ms on a 2-core machine), GIL time the
    engine thread needs for its launches."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, queue: asyncio.Queue, event) -> None:
        """From any thread; never raises (a closed event loop has nobody listening)."""
        self.post_many(((queue, event),))

    def post_many(self, posts) -> None:
        """`post` for several (queue, event) pairs at once, in order."""
        self._items.extend(posts)
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:  # the event loop: everything posted so far, in order
        with self._lock:
            self._scheduled = False  # what is posted from now on schedules the next delivery
        while self._items:
            queue, event = self._items.popleft()
            queue.put_nowait(event)


class RequestStream:
    """One request's events as the HTTP side sees them: `await next()` -> ("audio", int16 samples) ...
    ("end", status); `abort()`; `close()` when the response is over (aborts the request if it still runs)."""

    def __init__(self, service: "SpeechService", handle, queue: asyncio.Queue):
        self.service, self.handle, self.queue = service, handle, queue
        self.closed = False

    async def next(self):
        return await self.queue.get()

    def interrupt(self, reason: str) -> None:
        """Wake `next()` with ("gone", reason) (the client went away) and abort the request."""
        self.queue.put_nowait(("gone", reason))
        self.abort()

    def abort(self) -> None:
        if not self.handle.done:
            self.service.engine.abort(self.handle)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.abort()
            self.service._release(self)


class SpeechService:
    def __init__(self, load, settings: ServerSettings):
        """`load()` -> a CSM (called in the engine thread)."""
        self._load, self.settings = load, settings
        self.state = LOADING
        self.error: BaseException | None = None
        self.tts = None
        self.engine = None
        self.voices: VoiceBook | None = None
        self.sample_rate = 24_000
        self.engine_failures = 0
        self._inflight = 0
        self._streams: set[RequestStream] = set()
        self._failures = 0  # engine failures in a row
        self._mailbox: EventMailbox | None = None  # made by the first submit, on the HTTP side's event loop
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()  # set once loading ended, well or not
        self._rate = collections.deque(maxlen=64)  # (time, frames) samples for frames/s
        # The engine's step times, for /metrics (unregistered: the app's registry collects it through the service).
        # Every stream gets one frame (80 ms of audio) per step, so steps near 80 ms mean streams about to stall.
        self.step_times = Histogram("seseme_engine_step_seconds", "engine steps (one frame for every busy row) by host "
                                    "time; every stream gets 80 ms of audio per step", buckets=STEP_BUCKETS,
                                    registry=None)
        self._thread = threading.Thread(target=self._run, name="seseme-engine", daemon=True)

    # --- life cycle --------------------------------------------------------------------------------------------

    def start(self) -> "SpeechService":
        sys.setswitchinterval(self.settings.switch_interval_ms / 1000)  # ServerSettings says why
        self._thread.start()
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until loading has ended; True if the service is ready."""
        self._ready.wait(timeout)
        return self.state == READY

    def begin_drain(self) -> None:
        """Stop taking requests (503 from now on); those in flight go on."""
        with self._lock:
            if self.state in (LOADING, READY):
                self.state = DRAINING

    @property
    def inflight(self) -> int:
        """Requests accepted whose responses are not over yet."""
        return self._inflight

    def abort_all(self) -> None:
        """Abort every request still in flight (a drain that ran out of time)."""
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream.abort()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the engine thread (whatever still runs is aborted) and wait for it."""
        with self._lock:
            if self.state != FAILED:
                self.state = STOPPED
        self._stop.set()
        if self.engine is not None:
            self.engine.wakeup.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- the engine thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        engine = None
        try:
            tts = self._load()
            device = tts.device
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                engine = tts.speech_engine(self.settings.max_batch, pcm16=True, max_waiting=self.settings.max_queue)
                if self.settings.warm_up:
                    warm_up(engine)
                self.voices = VoiceBook(self.settings.voices_dir, self.settings.openai_voices, codec_id(tts.codec),
                                        tts.config.num_codebooks, tts.codec.cardinality)
                self.tts, self.engine, self.sample_rate = tts, engine, tts.sample_rate
                self._now_ready()
                self._loop(engine)
        except BaseException as e:  # the model did not load (or a bug): say so on /health and to the CLI
            self._fail(e)
        finally:
            self._ready.set()
            if engine is not None:
                with contextlib.suppress(Exception):
                    engine.close()

    def _now_ready(self) -> None:
        freeze_after_setup()  # this process's set-up is over (engine.collector: no full-collection pauses)
        with self._lock:
            if self.state == LOADING:
                self.state = READY
        self._ready.set()

    def _fail(self, e: BaseException) -> None:
        self.error = e
        with self._lock:
            self.state = FAILED
        if not isinstance(e, SesemeError):  # a bug: keep its traceback (a SesemeError is one line, at the CLI)
            log.exception("the engine thread failed", exc_info=e)

    def _loop(self, engine) -> None:
        while not self._stop.is_set():
            try:
                engine.run_forever(self._stop, on_step=self._on_step)
            except Exception as e:  # the step failed: every request in the engine failed with it (engine.step)
                self.engine_failures += 1
                self._failures += 1
                log.exception("the engine failed (%d in a row); its requests failed with it", self._failures)
                if engine.broken or self._failures >= MAX_CONSECUTIVE_FAILURES:  # broken: the decoder died
                    self.error = e
                    with self._lock:
                        self.state = FAILED
                    return

    def _on_step(self, out) -> None:
        self._failures = 0
        self.step_times.observe(self.engine.stats.last_step_s)
        self._sample_frames()

    def _sample_frames(self) -> None:
        now = time.perf_counter()
        if not self._rate or now - self._rate[-1][0] >= 0.25:
            self._rate.append((now, self.frames))

    # --- the HTTP side ---------------------------------------------------------------------------------------------

    def submit(self, request: SpeechRequest, request_id: str | None = None, listening: bool = True) -> RequestStream:
        """Queue a request; its events arrive on the returned stream. `listening`: a client plays the audio as it
        comes (the engine then reads its first frame without lag and decodes a small first chunk at once).
        Raises ApiError 503 (not ready) or 429 (queue full)."""
        loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = EventMailbox(loop)
        mailbox, queue = self._mailbox, asyncio.Queue()

        def forward(event) -> None:  # engine or audio thread: must never raise into them
            mailbox.post(queue, event)

        with self._lock:
            self.check_open()
            try:
                handle = self.engine.add_request(request, request_id, on_event=forward, keep_audio=False,
                                                 low_latency=listening)
            except QueueFull:
                raise self._queue_full() from None
            self._inflight += 1
            stream = RequestStream(self, handle, queue)
            self._streams.add(stream)
        return stream

    def _queue_full(self):
        return queue_full(f"the server is busy: {self.settings.max_queue} requests are already waiting; "
                          f"retry after {self.settings.retry_after_s} s", self.settings.retry_after_s)

    def check_open(self) -> None:
        wait = self.settings.unavailable_retry_after_s
        if self.state == LOADING:
            raise unavailable("the model is still loading; retry shortly", wait, "model_loading")
        if self.state == DRAINING or self.state == STOPPED:
            raise unavailable("the server is shutting down and takes no new requests", wait, "shutting_down")
        if self.state == FAILED:
            raise unavailable(f"the server is out of order: {self.describe_error()}", wait, "engine_failed")

    def _release(self, stream: RequestStream) -> None:
        with self._lock:
            self._inflight -= 1
            self._streams.discard(stream)

    def describe_error(self) -> str:
        return " ".join(str(self.error).split()) if self.error is not None else ""

    def count_tokens(self, text: str) -> int:
        return len(self.tts.tokenizer.encode(text)) if self.tts is not None else 0

    # --- numbers for /metrics ------------------------------------------------------------------------------------

    @property
    def active_rows(self) -> int:
        return self.engine.active_rows if self.engine is not None else 0

    @property
    def queue_depth(self) -> int:
        return self.engine.queue_depth if self.engine is not None else 0

    @property
    def frames(self) -> int:
        return self.engine.stats.frames if self.engine is not None else 0

    def frames_per_second(self) -> float:
        """Useful frames generated per second over the last RATE_WINDOW_S (0 when idle)."""
        now = time.perf_counter()
        points = [p for p in list(self._rate) if now - p[0] <= RATE_WINDOW_S]  # list(): one atomic copy
        points.append((now, self.frames))
        (t0, f0), (t1, f1) = points[0], points[-1]
        return (f1 - f0) / (t1 - t0) if t1 - t0 > 0.05 else 0.0

    def replica_stats(self) -> list[dict]:
        """Per engine replica (server.replicas): replica, up, active_rows, queue_depth, inflight, frames. One engine
        here: none."""
        return []


def warm_up(engine) -> None:
    """Speak one short request: first calls load kernels and allocator pools; pay for them before the first client
    does. Its text is over one chunk (10 s of speech, ~105 characters), so the sentence splitter's first call
    (~30 ms of regex set-up, in the engine's thread) and a long text's hand-over to its next chunk are paid here too
    (the first client of a server had the slowest first audio of its level, BENCHMARKS.md run 18)."""
    text = ("Hello. This short warm-up text runs a little longer than one chunk of speech, so that the sentence "
            "splitter is ready, and a second chunk follows the first.")
    handle = engine.add_request(SpeechRequest.make(text, max_audio_ms=2 * FRAME_MS, seed=0), keep_audio=False,
                                low_latency=True)
    engine.drain()
    handle.raise_for_status()
