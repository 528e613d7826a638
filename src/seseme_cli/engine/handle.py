"""A request inside the engine, as its caller sees it: status, audio as it is decoded, codes at the end.

The engine thread and the audio thread write into a handle; any other thread reads it. A caller either iterates
the handle (blocking: audio chunks, then the end) or gives `on_event`, called from the engine's threads with each
event (an HTTP server forwards them to its event loop with `call_soon_threadsafe`). Events, in order:
`("audio", samples)` any number of times (1-D float32, or int16 when the engine decodes to PCM16), then exactly
one `("end", status)` with status "finished", "failed" or "aborted".
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time

import numpy as np
import torch

from seseme_cli.errors import SesemeError
from seseme_cli.speech.request import SpeechRequest

log = logging.getLogger("seseme")
_ids = itertools.count()

WAITING, RUNNING, FINISHED, FAILED, ABORTED = "waiting", "running", "finished", "failed", "aborted"


class RequestAborted(SesemeError):
    """The request was aborted before it finished."""


class RequestHandle:
    def __init__(self, request: SpeechRequest, request_id: str | None = None, on_event=None, keep_audio: bool = True,
                 low_latency: bool = False):
        self.request = request
        self.id = request_id if request_id is not None else f"req-{next(_ids)}"
        self.on_event = on_event
        self.keep_audio = keep_audio
        self.status = WAITING
        self.error: str | None = None
        self.exception: SesemeError | None = None  # the error that failed it, when it is the request's own fault
        self.codes: torch.Tensor | None = None  # (frames, K) int64 on the CPU, once finished
        self.frames = 0  # frames generated so far (all chunks)
        self.chunks_total = 0  # text chunks, known once admitted
        self.chunks_done = 0
        self.truncated = 0  # chunks cut at their frame limit
        self.special = 0  # special ids decoded as code 0
        self.pieces: list[np.ndarray] = []  # decoded audio so far (keep_audio)
        self.samples = 0
        self.created = time.perf_counter()
        self.started: float | None = None  # admitted into a row
        self.first_frame: float | None = None  # its first frame's codes reached the host
        self.first_audio: float | None = None
        self.ended: float | None = None
        self.abort_requested = False
        self.low_latency = low_latency  # a listener waits for its first audio (engine.loop: no lag, small first chunk)
        self.prepared = None  # (job, first generation) of a request the prefill budget sent back to wait (engine.loop)
        self._events: queue.Queue = queue.Queue()
        self._done = threading.Event()

    # --- written by the engine -------------------------------------------------------------------------------

    def _emit(self, event) -> None:
        if self.on_event is None:
            self._events.put(event)
            return
        try:
            self.on_event(event)
        except Exception:  # noqa: BLE001 - a listener's bug must not fail the engine step or kill the decoder
            log.exception("request %s: its event listener raised; the event is dropped", self.id)

    def deliver_audio(self, samples: np.ndarray) -> None:
        if self.first_audio is None:
            self.first_audio = time.perf_counter()
        self.samples += len(samples)
        if self.keep_audio:
            self.pieces.append(samples)
        self._emit(("audio", samples))

    def deliver_end(self, status: str, error: str | None = None, exception: SesemeError | None = None) -> None:
        if self._done.is_set():
            return
        self.status, self.error, self.exception, self.ended = status, error, exception, time.perf_counter()
        self._done.set()
        self._emit(("end", status))

    # --- read by the caller ----------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def duration_s(self) -> float:
        from seseme_cli.speech.request import FRAME_MS

        return self.frames * FRAME_MS / 1000

    def raise_for_status(self) -> None:
        if self.status == FAILED:
            if self.exception is not None:  # e.g. an InputError: the caller's exit code depends on its kind
                raise self.exception
            raise SesemeError(self.error or "the request failed")
        if self.status == ABORTED:
            raise RequestAborted(self.error or "the request was aborted")

    def __iter__(self):
        """Audio chunks as they are decoded; raises the request's error at the end if it failed or was aborted.
        Only for handles made without `on_event`."""
        if self.on_event is not None:
            raise RuntimeError("this handle delivers its events to on_event")
        while True:
            kind, value = self._events.get()
            if kind == "audio":
                yield value
            else:
                self.raise_for_status()
                return

    def audio(self) -> np.ndarray:
        """All the decoded audio (keep_audio), in one array."""
        if not self.pieces:
            return np.zeros(0, np.float32)
        return np.concatenate(self.pieces)
