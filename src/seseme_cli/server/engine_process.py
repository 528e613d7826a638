"""`seseme serve`'s engine in a process of its own (the default on a GPU): HTTP and the engine stop sharing one GIL.

In one process, at 512 streams the GIL was held 64% of the time, 60% of that by the HTTP side (parsing, chunk
sends, the event loop) and 34% by the engine thread, whose frames waited for it: steps took 30-40 ms where the
engine alone takes 19.5 ms (BENCHMARKS.md run 16). Here the engine thread, its audio decoder and two pipe threads
run in a child process (spawned, not forked: CUDA does not survive a fork), and the front keeps only HTTP.

One duplex pipe between them carries pickled tuples (plain pickle: a tensor goes by value, not through shared
memory handles):
- front -> engine: ("add", key, request, request_id, listening), ("abort", key), ("stop",);
- engine -> front: ("ready", ReplicaInfo) or ("failed", error) once loading ended; then ("events", [(key, event,
  news), ...], stats) and, while no event comes, ("stats", stats) every STATS_EVERY_S (stats: /metrics' numbers).
Events go in bursts: whatever the engine's threads posted since the last write (an audio round hands chunks to
dozens of requests at once), one pipe write each, as the in-process EventMailbox wakes the event loop once per
burst. `news` is what the HTTP side shows besides the event (server.replicas.RemoteHandle: the queue wait with the
first event; frames, codes and the error with the end).

The front counts the limits (max_batch rows + max_queue waiting, then 429) as it does for replicas, so a refusal
needs no round trip. The child ignores SIGINT and SIGTERM (a terminal's Ctrl+C and a service manager's SIGTERM
reach the whole process group): the front drains, then says ("stop",); a child whose pipe closes (the front died)
stops too. A child that dies fails the requests in flight (a 500, or a stream cut short) and the service (/health
503, the CLI exits non-zero).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import multiprocessing
import pickle
import signal
import sys
import threading
import time

from seseme_cli.engine.collector import freeze_after_setup
from seseme_cli.errors import SesemeError
from seseme_cli.server.errors import unavailable
from seseme_cli.server.replicas import RemoteHandle
from seseme_cli.server.service import (FAILED, LOADING, MAX_CONSECUTIVE_FAILURES, STOPPED, EventMailbox,
                                       RequestStream, SpeechService)
from seseme_cli.server.settings import ServerSettings
from seseme_cli.server.voices import VoiceBook

log = logging.getLogger("seseme")

STATS_EVERY_S = 0.25  # how often the engine sends its numbers (/metrics) and step times
STOP_TIMEOUT_S = 30.0  # what the front waits for the child to finish after ("stop",), before it kills it


def _dumps(message) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def _portable(e: BaseException) -> BaseException:
    """An exception the other side can unpickle: itself if it survives a round trip, else a SesemeError (for a
    user's problem) or RuntimeError with its type and message."""
    with contextlib.suppress(Exception):
        pickle.loads(_dumps(e))
        return e
    if isinstance(e, SesemeError):
        return SesemeError(str(e))
    return RuntimeError(f"{type(e).__name__}: {e}")


# --- the engine's side (the child process) -------------------------------------------------------------------------


def engine_main(conn, settings: ServerSettings) -> None:
    """The child process: load, warm up, say ready, then serve the pipe until ("stop",) or until it closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _EngineSide(conn, settings).run()


class _EngineSide:
    def __init__(self, conn, settings: ServerSettings):
        self.conn, self.settings = conn, settings
        self.engine = None
        self.handles: dict[int, object] = {}  # key -> the engine's RequestHandle, until its end is posted
        self.outbox: collections.deque = collections.deque()  # (key, event, news), in the order posted
        self.step_times: collections.deque = collections.deque()
        self.failures = 0  # failed steps, all told
        self.wake = threading.Event()  # something to send
        self.stop = threading.Event()
        self.sending = True
        self._write_lock = threading.Lock()

    def send(self, message) -> None:
        data = _dumps(message)
        with self._write_lock:
            self.conn.send_bytes(data)

    def run(self) -> None:
        import torch

        from seseme_cli.cli.common import load_model
        from seseme_cli.replicas.replica import ReplicaInfo
        from seseme_cli.server.service import warm_up
        from seseme_cli.server.voices import codec_id

        sys.setswitchinterval(self.settings.switch_interval_ms / 1000)  # ServerSettings says why
        sender = threading.Thread(target=self._send_loop, name="seseme-engine-send", daemon=True)
        try:
            started = time.perf_counter()
            tts = load_model(self.settings.model, self.settings.device)
            device = tts.device
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                self.engine = engine = tts.speech_engine(self.settings.max_batch, pcm16=True)
                if self.settings.warm_up:
                    warm_up(engine)
                freeze_after_setup()
                info = ReplicaInfo(0, engine.B, tts.description, tts.is_random, tts.sample_rate, tts.tokenizer,
                                   codec_id(tts.codec), tts.config.num_codebooks, tts.codec.cardinality,
                                   time.perf_counter() - started)
                self.send(("ready", info))
                threading.Thread(target=self._receive, name="seseme-engine-receive", daemon=True).start()
                sender.start()
                error = self._loop(engine)
        except BaseException as e:  # the model did not load (or a bug): the front says so
            if not isinstance(e, SesemeError):
                log.exception("the engine process failed", exc_info=e)
            error = e
        finally:
            if self.engine is not None:
                with contextlib.suppress(Exception):
                    self.engine.close()  # aborts what is left: those ends are still sent
            if sender.is_alive():
                self.sending = False
                self.wake.set()
                sender.join(10)
        with contextlib.suppress(OSError):
            if error is not None:
                self.send(("failed", _portable(error)))
            self.conn.close()

    def _loop(self, engine) -> BaseException | None:
        """Step until told to stop; the error the engine gave up with, if it did (SpeechService._loop's rule)."""
        in_a_row = 0

        def on_step(out) -> None:
            nonlocal in_a_row
            in_a_row = 0
            self.step_times.append(engine.stats.last_step_s)

        while not self.stop.is_set():
            try:
                engine.run_forever(self.stop, on_step=on_step)
            except Exception as e:  # the step failed: every request in the engine failed with it (engine.step)
                self.failures += 1
                in_a_row += 1
                log.exception("the engine failed (%d in a row); its requests failed with it", in_a_row)
                if engine.broken or in_a_row >= MAX_CONSECUTIVE_FAILURES:
                    return e
        return None

    # --- the pipe --------------------------------------------------------------------------------------------

    def _receive(self) -> None:
        while True:
            try:
                message = pickle.loads(self.conn.recv_bytes())
            except (EOFError, OSError):  # the front is gone: nobody is listening
                message = ("stop",)
            kind = message[0]
            if kind == "add":
                self._add(*message[1:])
            elif kind == "abort":
                handle = self.handles.get(message[1])
                if handle is not None:
                    self.engine.abort(handle)
            elif kind == "stop":
                self.stop.set()
                self.engine.wakeup.set()
                return

    def _add(self, key: int, request, request_id: str | None, listening: bool) -> None:
        first = True

        def forward(event) -> None:  # the engine's threads: must never raise into them
            nonlocal first
            handle = self.handles.get(key)
            news = {}
            if handle is not None:
                if first and handle.started is not None:
                    news["queue_wait"] = handle.started - handle.created
                    first = False
                if event[0] == "end":
                    self.handles.pop(key, None)
                    exception = handle.exception
                    news.update(frames=handle.frames, codes=handle.codes, error=handle.error,
                                exception=None if exception is None else _portable(exception))
            self.outbox.append((key, event, news))
            self.wake.set()

        try:
            self.handles[key] = self.engine.add_request(request, request_id, on_event=forward, keep_audio=False,
                                                        low_latency=listening)
        except Exception as e:  # noqa: BLE001 - a request the engine refuses fails alone
            self.outbox.append((key, ("end", "failed"), {"error": str(e), "exception": _portable(e)}))
            self.wake.set()

    def _send_loop(self) -> None:
        next_stats = 0.0
        while True:
            self.wake.wait(STATS_EVERY_S)
            self.wake.clear()
            going = self.sending
            batch = []
            while self.outbox:
                batch.append(self.outbox.popleft())
            try:
                now = time.perf_counter()
                if batch:  # with the numbers as they are now: /metrics is as fresh as the audio
                    next_stats = now + STATS_EVERY_S
                    self.send(("events", batch, self._stats()))
                elif now >= next_stats or not going:
                    next_stats = now + STATS_EVERY_S
                    self.send(("stats", self._stats()))
            except OSError:  # the front is gone
                return
            if not going:
                return

    def _stats(self) -> dict:
        engine, times = self.engine, []
        while self.step_times:
            times.append(self.step_times.popleft())
        return {"active_rows": engine.active_rows, "queue_depth": engine.queue_depth, "frames": engine.stats.frames,
                "failures": self.failures, "step_times": times}


# --- the front's side ------------------------------------------------------------------------------------------


class ProcessStream(RequestStream):
    """A RequestStream whose events come from the engine process (the front's pipe thread fills its queue)."""

    def __init__(self, service: "EngineProcessService", key: int, queue: asyncio.Queue):
        super().__init__(service, RemoteHandle(), queue)
        self.key = key

    def abort(self) -> None:
        if not self.handle.done:
            self.service.tell(("abort", self.key))


class EngineProcessService(SpeechService):
    def __init__(self, settings: ServerSettings):
        super().__init__(None, settings)
        self._thread.name = "seseme-engine-pipe"
        self._conn = None
        self._process = None
        self._keys = itertools.count()
        self._by_key: dict[int, ProcessStream] = {}
        self._load = 0  # requests sent to the engine and not released: its rows plus its queue
        self._write_lock = threading.Lock()
        self._stats = {"active_rows": 0, "queue_depth": 0, "frames": 0, "failures": 0}

    # --- the front's thread: start the child, then read the pipe ------------------------------------------------

    def _run(self) -> None:
        context = multiprocessing.get_context("spawn")
        conn, child_end = context.Pipe()
        process = context.Process(target=engine_main, args=(child_end, self.settings), name="seseme-engine",
                                  daemon=True)
        try:
            process.start()
            child_end.close()
            self._conn, self._process = conn, process
            self._read(conn)
            if self.state not in (STOPPED, FAILED):  # the pipe closed without a word: the child died
                process.join(5)
                self._fail(SesemeError(f"the engine process exited unexpectedly (exit code {process.exitcode})"))
        except BaseException as e:  # a bug on this side
            self._fail(e)
        finally:
            self._ready.set()
            self._lose_all()
            with contextlib.suppress(Exception):
                conn.close()

    def _read(self, conn) -> None:
        while True:
            try:
                message = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                return
            kind = message[0]
            if kind == "events":
                self._take_stats(message[2])
                self._deliver(message[1])
            elif kind == "stats":
                self._take_stats(message[1])
            elif kind == "ready":
                info = message[1]
                self.voices = VoiceBook(self.settings.voices_dir, self.settings.openai_voices, info.codec_id,
                                        info.num_codebooks, info.cardinality)
                self.tts, self.sample_rate = info, info.sample_rate  # tts: its description and tokenizer
                self._now_ready()
            elif kind == "failed":
                self._fail(message[1])

    def _deliver(self, batch) -> None:
        posts = []
        for key, event, news in batch:
            stream = self._by_key.get(key)
            if stream is None:  # its response is already over
                continue
            stream.handle.update(event, news)
            posts.append((stream.queue, event))
        if posts and self._mailbox is not None:
            self._mailbox.post_many(posts)

    def _take_stats(self, stats: dict) -> None:
        for seconds in stats.pop("step_times"):
            self.step_times.observe(seconds)
        self._stats = stats
        self.engine_failures = stats["failures"]
        self._sample_frames()

    def _lose_all(self) -> None:
        """The engine is gone: every request still in flight fails (its response ends with the error)."""
        why = self.describe_error() or "the engine process stopped"
        with self._lock:
            streams = list(self._by_key.values())
        posts = []
        for stream in streams:
            if not stream.handle.done:
                stream.handle.update(("end", "failed"), {"error": f"the engine failed: {why}"})
                posts.append((stream.queue, ("end", "failed")))
        if posts and self._mailbox is not None:
            self._mailbox.post_many(posts)

    def tell(self, message) -> bool:
        """Send a message to the engine; False if it is gone (any thread)."""
        conn = self._conn
        if conn is None:
            return False
        data = _dumps(message)
        try:
            with self._write_lock:
                conn.send_bytes(data)
            return True
        except (OSError, ValueError):  # closed or broken: _run sees it too and fails what is in flight
            return False

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the engine process (whatever still runs is aborted there) and wait for it."""
        with self._lock:
            loading = self.state == LOADING
            if self.state != FAILED:
                self.state = STOPPED
        self._stop.set()
        process = self._process
        if process is not None and (loading or not self.tell(("stop",))):
            process.kill()  # still loading (nothing to lose) or deaf
        if self._thread.is_alive():
            self._thread.join(timeout)
        if process is not None:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)

    # --- the HTTP side ---------------------------------------------------------------------------------------------

    def submit(self, request, request_id: str | None = None, listening: bool = True) -> ProcessStream:
        loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = EventMailbox(loop)
        with self._lock:
            self.check_open()
            if self._load >= self.settings.max_batch + self.settings.max_queue:
                raise self._queue_full()
            key = next(self._keys)
            stream = ProcessStream(self, key, asyncio.Queue())
            self._by_key[key] = stream
            self._load += 1
            self._inflight += 1
            self._streams.add(stream)
        if not self.tell(("add", key, request, request_id, listening)):
            stream.close()
            raise unavailable("the engine is not running", self.settings.unavailable_retry_after_s, "engine_failed")
        return stream

    def _release(self, stream: ProcessStream) -> None:
        with self._lock:
            self._inflight -= 1
            self._load -= 1
            self._streams.discard(stream)
            self._by_key.pop(stream.key, None)

    # --- numbers for /metrics ------------------------------------------------------------------------------------

    @property
    def active_rows(self) -> int:
        return self._stats["active_rows"]

    @property
    def queue_depth(self) -> int:
        return self._stats["queue_depth"]

    @property
    def frames(self) -> int:
        return self._stats["frames"]


def engine_process_default(device: str) -> bool:
    """`seseme serve`'s default: the engine in its own process on a GPU (where the GIL is what limits a busy
    server), in the server's process on the CPU (the model is the limit there, and one process starts faster)."""
    return device.startswith("cuda")
