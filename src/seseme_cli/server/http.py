"""uvicorn with a draining shutdown, the way a server behind a load balancer should go away.

On SIGTERM (or Ctrl+C) uvicorn would close its listening socket at once, and re-raise the signal after its own
shutdown, so the process would not exit 0. Here the first signal only starts a drain: the port stays open, new
requests get 503 with Retry-After and /health says 503 (so a balancer routes elsewhere), and requests in flight
finish; once none is left (or after `drain_timeout_s`, when the rest are aborted) uvicorn shuts down and `run`
returns normally. A second Ctrl+C quits at once.
"""

from __future__ import annotations

import signal
import time

import uvicorn

from seseme_cli.server.service import FAILED, READY, SpeechService


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: SpeechService, drain_timeout_s: float, on_ready=None):
        super().__init__(config)
        self.service, self.drain_timeout_s, self.on_ready = service, drain_timeout_s, on_ready
        self.drain_started: float | None = None
        self.aborted = False
        self._announced = False

    def handle_exit(self, sig: int, frame) -> None:
        # Not recorded for re-raising (uvicorn's default): a drained server exits 0.
        if self.drain_started is not None:
            if sig == signal.SIGINT:
                self.should_exit = self.force_exit = True
            return
        self.drain()

    def drain(self) -> None:
        """Start draining (thread-safe: only sets flags); the server exits once nothing is in flight."""
        if self.drain_started is None:
            self.drain_started = time.monotonic()
            self.service.begin_drain()

    async def on_tick(self, counter: int) -> bool:
        if not self._announced and self.started and self.service.state == READY:
            self._announced = True
            if self.on_ready is not None:
                self.on_ready(self)
        if self.service.state == FAILED and self.drain_started is None:
            self.should_exit = True  # nothing can be served: exit (the CLI reports the service's error)
        if self.drain_started is not None and not self.should_exit:
            if self.service.inflight == 0:
                self.should_exit = True
            elif time.monotonic() - self.drain_started > self.drain_timeout_s:
                if not self.aborted:
                    self.aborted = True
                    self.service.abort_all()  # their responses end (cut) and in-flight drops to 0
                elif time.monotonic() - self.drain_started > self.drain_timeout_s + 5:
                    self.should_exit = True
        return await super().on_tick(counter)

    @property
    def port(self) -> int | None:
        """The port actually bound (useful with port 0)."""
        for server in self.servers:
            for sock in server.sockets:
                return sock.getsockname()[1]
        return None


def make_server(app, service: SpeechService, host: str, port: int, drain_timeout_s: float, on_ready=None,
                log_level: str = "info", access_log: bool = True) -> DrainingServer:
    # timeout_graceful_shutdown: our own drain has already waited for the requests; this only bounds the rest.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=10, lifespan="off")
    return DrainingServer(config, service, drain_timeout_s, on_ready)
