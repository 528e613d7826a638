"""One engine replica: a CSM model and one engine loop in a process of its own, run as a Ray actor.

cluster.py wraps this class in `ray.remote` (one GPU each); this module never imports ray. The actor is an asyncio
actor: its methods run on the actor's event loop, while one thread of its own steps the engine (as the server's
engine thread does), so frames never wait for a method call. Two ways in:
- `seseme batch`: `exchange(items)` queues requests (their context files are read and encoded in the engine
  thread, once per file, as on one GPU) and returns the requests that ended since the last call, with their whole
  audio, for the driver to write; it waits up to `wait_s` for at least one.
- `seseme serve`: `speak(request)` is a streaming generator of the request's events (audio chunks, then its end
  with what the HTTP response needs); `abort(key)` stops one.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, replace

from seseme_cli.engine.collector import freeze_after_setup
from seseme_cli.errors import SesemeError

log = logging.getLogger("seseme")

IDLE_WAIT_S = 0.1  # the engine thread's sleep while it has nothing to do (add_request and abort wake it at once)


@dataclass
class ReplicaInfo:
    """What the driver needs to know of a replica once it is set up."""

    index: int
    rows: int  # engine rows (requests generated together)
    description: str
    is_random: bool
    sample_rate: int
    tokenizer: object
    codec_id: str
    num_codebooks: int
    cardinality: int
    setup_s: float  # model load and engine build


@dataclass
class BatchItem:
    """A batch request on its way to a replica: `key` is the driver's name for it."""

    key: int
    name: str
    speech: object  # SpeechRequest without context
    context: list  # manifest.ContextTurn with absolute paths


@dataclass
class BatchResult:
    key: int
    pieces: list | None  # the audio (1-D pieces in order) when it finished, else None
    error: str | None = None
    special: int = 0
    truncated: int = 0


@dataclass
class Exchange:
    """`exchange`'s answer: what ended, the frames generated so far, and the replica's fatal error if it has one
    (then the requests not in `results` will not end here)."""

    results: list[BatchResult]
    frames: int
    error: str | None = None


class Replica:
    def __init__(self, index: int, model: str, device: str):
        self.index, self.model, self.device = index, model, device
        self.tts = None
        self.engine = None
        self.error: str | None = None  # the engine thread gave up (its requests have all ended)
        self.failures = 0  # engine steps that failed, all told
        self._inbox: collections.deque[BatchItem] = collections.deque()
        self._handles: dict[int, object] = {}  # batch key -> handle
        self._results: list[BatchResult] = []
        self._speaking: dict[int, object] = {}  # server key -> handle
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self._loop = None
        self._wake = None

    # --- set-up ------------------------------------------------------------------------------------------------

    async def setup(self, rows: int | None, todo: int, pcm16: bool, warm_up: bool = False,
                    max_failures: int = 1) -> ReplicaInfo:
        """Load the model and build the engine (`rows` rows, or what fits for `todo` requests: batch.run's
        rule), then start the engine thread. `max_failures`: failed steps in a row before the replica gives up."""
        from seseme_cli.api import load_csm_1b_optimized
        from seseme_cli.batch.run import ContextCache, pick_batch_size
        from seseme_cli.server.service import warm_up as warm_up_engine
        from seseme_cli.server.voices import codec_id

        started = time.perf_counter()
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        tts = self.tts = load_csm_1b_optimized(self.model, device=self.device)
        rows = pick_batch_size(tts, rows, todo)
        self.engine = tts.speech_engine(rows, pcm16=pcm16)
        if warm_up:
            warm_up_engine(self.engine)
        self.contexts = ContextCache(tts)
        freeze_after_setup()
        self.max_failures = max_failures
        self._thread = threading.Thread(target=self._run, name=f"seseme-replica-{self.index}", daemon=True)
        self._thread.start()
        return ReplicaInfo(self.index, rows, tts.description, tts.is_random, tts.sample_rate, tts.tokenizer,
                           codec_id(tts.codec), tts.config.num_codebooks, tts.codec.cardinality,
                           time.perf_counter() - started)

    async def stats(self) -> dict:
        engine = self.engine
        return {"replica": self.index, "active_rows": engine.active_rows if engine else 0,
                "queue_depth": (engine.queue_depth + len(self._inbox)) if engine else 0,
                "frames": engine.stats.frames if engine else 0, "failures": self.failures, "error": self.error}

    async def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self.engine.wakeup.set()
            self._thread.join(30)
        if self.engine is not None:
            self.engine.close()

    # --- the engine thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        engine, failed = self.engine, 0
        while not self._stop.is_set():
            try:
                self._admit_inbox()
                if not engine.has_work():
                    engine.wakeup.wait(IDLE_WAIT_S)
                    engine.wakeup.clear()
                    continue
                engine.step()
                failed = 0
            except Exception as e:  # the step failed: every request in the engine failed with it (engine.step)
                self.failures += 1
                failed += 1
                log.exception("replica %d: the engine failed (%d in a row); its requests failed with it",
                              self.index, failed)
                if engine.broken or failed >= self.max_failures:
                    self.error = f"replica {self.index}: the engine failed: {type(e).__name__}: {e}"
                    self._notify()
                    return

    def _admit_inbox(self) -> None:
        """Queue the batch items that came in; their context files are read and encoded here, in the engine's
        thread, between steps (as batch.run does on one GPU), once per file."""
        while self._inbox:
            item = self._inbox.popleft()
            try:
                speech = replace(item.speech, context=tuple(self.contexts.turn(c) for c in item.context))
            except Exception as e:  # noqa: BLE001 - this request's context (a SesemeError) or a bug: it alone fails
                why = str(e) if isinstance(e, SesemeError) else f"{type(e).__name__}: {e}"
                self._ended(BatchResult(item.key, None, " ".join(why.split())))
                continue
            self._handles[item.key] = self.engine.add_request(speech, request_id=item.name,
                                                              on_event=self._batch_event(item.key))

    # --- seseme batch ------------------------------------------------------------------------------------------

    async def exchange(self, items: list[BatchItem], wait_s: float) -> Exchange:
        """Queue `items`; return what ended since the last call, waiting up to `wait_s` for something to end."""
        self._inbox.extend(items)
        self.engine.wakeup.set()
        self._wake.clear()
        if not self._results and self.error is None:
            try:
                await asyncio.wait_for(self._wake.wait(), wait_s)
            except asyncio.TimeoutError:
                pass
        with self._lock:
            results, self._results = self._results, []
        return Exchange(results, self.engine.stats.frames, self.error)

    def _batch_event(self, key: int):
        def on_event(event) -> None:  # the engine's threads
            kind, status = event
            if kind != "end":
                return
            handle = self._handles.pop(key)
            if status == "finished":
                self._ended(BatchResult(key, handle.pieces, None, handle.special, handle.truncated))
            else:
                self._ended(BatchResult(key, None, handle.error or status))

        return on_event

    def _ended(self, result: BatchResult) -> None:
        with self._lock:
            self._results.append(result)
        self._notify()

    def _notify(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # the actor's loop is closed: it is going away
            pass

    # --- seseme serve ------------------------------------------------------------------------------------------

    async def speak(self, request, key: int, listening: bool, request_id: str | None = None):
        """Generate one request; yields (event, news): the handle's events, each with what changed that the HTTP
        side shows (the queue wait with the first event; frames, codes and the error with the end)."""
        loop, events = self._loop, asyncio.Queue()

        def forward(event) -> None:  # the engine's threads: must never raise into them
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:
                pass

        if self.error is not None:
            yield ("end", "failed"), {"error": self.error}
            return
        handle = self.engine.add_request(request, request_id, on_event=forward, keep_audio=False,
                                         low_latency=listening)
        self._speaking[key] = handle
        first = True
        try:
            while True:
                kind, value = await events.get()
                news = {}
                if first and handle.started is not None:
                    news["queue_wait"] = handle.started - handle.created
                first = False
                if kind == "end":
                    news.update(frames=handle.frames, codes=handle.codes, error=handle.error,
                                exception=handle.exception)
                    yield (kind, value), news
                    return
                yield (kind, value), news
        finally:
            self._speaking.pop(key, None)
            if not handle.done:
                self.engine.abort(handle)

    async def abort(self, key: int) -> None:
        handle = self._speaking.get(key)
        if handle is not None:
            self.engine.abort(handle)
