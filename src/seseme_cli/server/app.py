"""The FastAPI app: OpenAI's speech endpoint and model list, seseme's voices, health and metrics.

Every error a client can get has OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: bad fields and
bad JSON are 400 (FastAPI's 422 shape never leaves), unknown routes 404, bodies over the limit 413, a full queue
429 and a server that is loading or shutting down 503 (both with Retry-After), a bug 500 without a traceback.
"""

from __future__ import annotations

import hmac
import logging
import re
import time

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from seseme_cli import __version__
from seseme_cli.server.errors import ApiError, error_body
from seseme_cli.server.metrics import CONTENT_TYPE, Metrics
from seseme_cli.server.plan import make_plan, parse_body, validation_error
from seseme_cli.server.responses import SpeechResponse
from seseme_cli.server.service import READY, SpeechService
from seseme_cli.server.settings import ServerSettings

log = logging.getLogger("seseme")

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class BodyLimit:
    """Reads a request's body up to `max_bytes` (answering 413 beyond it, before the app sees any of it), then
    hands the app the body and, after it, the connection's own messages (so a disconnect is still seen)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._too_large(send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send) -> None:
        error = ApiError(413, f"the request body is larger than the server's limit of {self.max_bytes} bytes",
                         code="request_too_large")
        response = error.response()
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body, "more_body": False})


def create_app(service: SpeechService, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="seseme", version=__version__, summary="OpenAI-compatible speech with Sesame's CSM-1B")
    metrics = Metrics(service)
    app.state.service, app.state.settings, app.state.metrics = service, settings, metrics
    created = int(time.time())
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    # --- errors, all in OpenAI's shape -------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see /docs"
            body = error_body(message, code="unknown_url")
        elif exc.status_code == 405:
            body = error_body(f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
        else:
            body = error_body(str(exc.detail))
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):
        log.error("error while serving %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(error_body("internal server error (the server log has the details)", "server_error",
                                       code="internal_error"), status_code=500)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
            metrics.outcome("invalid")
            raise ApiError(401, "missing or wrong API key: send the header Authorization: Bearer <key>",
                           code="invalid_api_key")

    authorized = [Depends(authorize)]

    # --- OpenAI's endpoints ----------------------------------------------------------------------------------------

    @app.post("/v1/audio/speech", dependencies=authorized)
    async def speech(request: Request):
        """Text to speech (OpenAI's body, plus speaker, temperature, topk, seed, max_audio_ms, context, stream)."""
        received = time.perf_counter()
        try:
            service.check_open()
        except ApiError:
            metrics.outcome("unavailable")
            raise
        wanted_id = request.headers.get("x-request-id", "")
        try:
            body = parse_body(await request.body())
            plan = await make_plan(body, settings, service.voices, service.sample_rate,
                                   wanted_id if REQUEST_ID.fullmatch(wanted_id) else None)
        except ApiError:
            metrics.outcome("invalid")
            raise
        try:
            stream = service.submit(plan.request, plan.request_id, listening=plan.stream)
        except ApiError as e:
            metrics.outcome("rejected" if e.status == 429 else "unavailable")
            raise
        return SpeechResponse(stream, plan, service, metrics, received)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "seseme"}

    @app.get("/v1/models", dependencies=authorized)
    async def models():
        return {"object": "list", "data": [model_card(n) for n in settings.model_names]}

    @app.get("/v1/models/{name}", dependencies=authorized)
    async def model(name: str):
        if name not in settings.model_names:
            raise ApiError(404, f"the model {name!r} does not exist; this server has {', '.join(settings.model_names)}",
                           param="model", code="model_not_found")
        return model_card(name)

    # --- seseme's ----------------------------------------------------------------------------------------------

    @app.get("/v1/voices", dependencies=authorized)
    async def voices():
        """The voices a request may name: stored ones first, then OpenAI's names mapped to speaker ids."""
        service.check_open()
        return {"object": "list", "data": [v.describe() for v in service.voices.voices()]}

    @app.get("/health")
    async def health():
        """200 once the weights are loaded and the engine (caches, graphs) is built and warm; 503 before, while
        draining, and after a failure."""
        body = {"status": service.state, "model": settings.served_model_name}
        if service.state == READY:
            body.update(weights=service.tts.description, active_rows=service.active_rows, queue_depth=service.queue_depth,
                        max_batch=settings.max_batch, max_queue=settings.max_queue)
            return body
        if service.error is not None:
            body["error"] = service.describe_error()
        headers = {"Retry-After": str(settings.unavailable_retry_after_s)}
        return JSONResponse(body, status_code=503, headers=headers)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app
