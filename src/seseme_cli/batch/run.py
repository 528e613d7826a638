"""Generation for `seseme batch`: the engine loop (engine.loop.SpeechEngine) fed from the file's requests, Mimi
decoding each request while it generates (in the engine's audio thread), and a small pool of threads that creates
each request's temp file as it is queued and, once it is finished, writes the file atomically and appends its
manifest record. The frame loop never waits for decoding, file creation or encoding.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from seseme_cli.audio import files as audio_io
from seseme_cli.batch.manifest import Manifest, Request
from seseme_cli.engine.collector import freeze_after_setup
from seseme_cli.engine.handle import FINISHED
from seseme_cli.engine.loop import Stats
from seseme_cli.errors import SesemeError
from seseme_cli.speech.longform import CHARS_PER_SECOND, max_chunk_chars
from seseme_cli.speech.request import Turn

RESERVE_BYTES = 8 << 30  # GPU memory left for Mimi (~5 GB per decode call), context encoding and the allocator
MAX_AUTO_BATCH = 512
# Mimi's streaming state per batch row (RowAudio): mostly its decoder transformer's KV cache, fp32, 8 layers x K/V
# x 250 steps x 512 = 8.2 MB (moshi allocated 500 MB per layer for 512 rows on the H100).
ROW_AUDIO_SLOT_BYTES = 9 << 20


@dataclass
class Tally:
    """What happened to this run's requests; updated from the scheduler and the writer thread."""

    total: int = 0
    ok: int = 0
    failed: list[tuple[Request, str]] = field(default_factory=list)
    audio_s: float = 0.0
    special: int = 0  # special ids decoded as code 0
    truncated: int = 0  # requests with a long-form chunk cut at its limit
    batch_size: int = 0  # engine rows (of each replica)
    replicas: int = 1  # engine replicas (seseme batch --gpus N)
    retried: int = 0  # requests started again on another replica after theirs died
    setup_s: float = 0.0  # engine (CUDA graphs) and decoder set-up, before generation starts
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def done(self) -> int:
        return self.ok + len(self.failed)


# --- sizing and the engine -------------------------------------------------------------------------------------

def pick_batch_size(tts, requested: int | None, todo: int) -> int:
    """The requested size, or what fits: on a GPU the rows that fit in free memory (up to 512); on a CPU 4.
    Never more rows than requests."""
    if requested is not None:
        return max(1, min(requested, todo))
    if tts.device.type != "cuda":
        return max(1, min(4, todo))
    from seseme_cli.engine.runner import bytes_per_row

    free, _ = torch.cuda.mem_get_info(tts.device)
    fits = int((free - RESERVE_BYTES) // (bytes_per_row(tts.config, tts.dtype) + ROW_AUDIO_SLOT_BYTES))
    if fits < 1:
        raise SesemeError(f"not enough free GPU memory for one batch row ({free / 1e9:.1f} GB free)")
    return max(1, min(fits, MAX_AUTO_BATCH, todo))


# --- context audio: read and encoded once per file ---------------------------------------------------------------

class ContextCache:
    def __init__(self, tts):
        self.tts, self.turns = tts, {}

    def turn(self, ctx):
        key = str(ctx.audio)
        if key not in self.turns:
            audio = audio_io.load_audio(ctx.audio, target_sample_rate=self.tts.sample_rate)
            self.turns[key] = self.tts.encode_audio(audio)
        return Turn(ctx.speaker, ctx.text, self.turns[key])


# --- writing in the background ----------------------------------------------------------------------------------

class Writer:
    """Writes finished requests' audio in a small thread pool and records each outcome in the manifest.

    `prepare(req)` when a request starts generating creates its temp file in the pool at once (see
    audio_io.PendingAudioFile: creating a file costs more than writing a short one), so that when many requests
    end together only the writes are left. `submit` writes a request's audio (into its prepared file, or a new
    one), `discard` drops the prepared file of a request that failed, `close` drops any never written and waits
    for the pool. prepare and discard are called from the scheduler's thread, submit from RowAudio's."""

    def __init__(self, tts, tally: Tally, on_done, threads: int = 1):
        self.tts, self.tally, self.on_done = tts, tally, on_done
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="seseme-write")
        # id(req) -> Future of its PendingAudioFile: a Request is an unhashable dataclass, and the requests outlive
        # the writer, so an id is not reused while it is here.
        self.prepared: dict[int, Future] = {}
        self.lock = threading.Lock()

    def prepare(self, req: Request) -> None:
        future = self.pool.submit(self._create, req)
        with self.lock:
            self.prepared[id(req)] = future

    def submit(self, req: Request, pieces: list[np.ndarray], special: int) -> None:
        """Write a request's audio, given as 1-D pieces in order (RowAudio's hand-over: float32, or int16 samples)."""
        with self.tally.lock:
            self.tally.special += special
        self.pool.submit(self._write, req, self._take(req), pieces)

    def discard(self, req: Request) -> None:
        """Remove the prepared temp file of a request that will not be written (its failure is recorded elsewhere)."""
        prepared = self._take(req)
        if prepared is not None:
            self.pool.submit(_discard, prepared)

    def close(self) -> None:
        with self.lock:  # left over only when the run stopped early (the scheduler or the decoder raised)
            left, self.prepared = list(self.prepared.values()), {}
        for prepared in left:
            self.pool.submit(_discard, prepared)
        self.pool.shutdown(wait=True)

    def _take(self, req: Request) -> Future | None:
        with self.lock:
            return self.prepared.pop(id(req), None)

    @staticmethod
    def _create(req: Request) -> audio_io.PendingAudioFile:
        req.output.parent.mkdir(parents=True, exist_ok=True)
        return audio_io.PendingAudioFile(req.output)

    def _write(self, req: Request, prepared: Future | None, pieces: list[np.ndarray]) -> None:
        try:
            # The pool's threads take its tasks in the order they were submitted, and the prepare task came first,
            # so it has started on some thread already (or finished): waiting for it here cannot deadlock, however
            # few threads the pool has. Its errors (say an unwritable directory) are this request's, as any below.
            pending = prepared.result() if prepared is not None else self._create(req)
            pending.write(pieces, self.tts.sample_rate)
        except (SesemeError, OSError) as e:
            self.on_done(req, None, str(e))
            return
        except Exception as e:  # noqa: BLE001 - in a pool thread nothing else would ever report it
            self.on_done(req, None, f"{type(e).__name__}: {e}")
            return
        self.on_done(req, sum(len(p) for p in pieces) / self.tts.sample_rate, None)


def _discard(prepared: Future) -> None:
    """A pool task, after the prepare task (the order argument in Writer._write)."""
    try:
        pending = prepared.result()
    except Exception:  # noqa: BLE001 - nothing was created; the request's failure is recorded by whoever discards
        return
    pending.discard()


def writer_threads(requests: list[Request]) -> int:
    """One writer thread when every output is WAV, four otherwise. Writing a WAV is mostly Python and numpy calls
    that hold the GIL, so threads only queue for it: 512 files of 4 s handed over at once took 0.22-0.24 s to
    write with one thread, 0.28-0.31 s with two and 0.37-0.45 s with four (2-core machine). FLAC and Vorbis
    encoding runs in libsndfile, where more threads can help."""
    return 1 if all_wav(requests) else 4


def all_wav(requests: list[Request]) -> bool:
    """Whether every output is WAV: then the decoder hands over 16-bit samples (row_audio.RowAudio's pcm16)."""
    return all(r.output.suffix.lower() == ".wav" for r in requests)


# --- order -----------------------------------------------------------------------------------------------------

def expected_ms(req: Request) -> float:
    """A guess of how long a request will speak: its text at a slow speaking rate, at most what its limits allow
    (each chunk at most min(max_audio_ms, chunk_ms))."""
    speech = req.speech
    chunks = math.ceil(len(speech.text) / max_chunk_chars(speech.chunk_ms))
    bound = chunks * min(speech.max_audio_ms, speech.chunk_ms) if chunks > 1 else speech.max_audio_ms
    return min(1.5 * len(speech.text) / CHARS_PER_SECOND * 1000, bound)


def longest_first(requests: list[Request]) -> list[Request]:
    """The longest requests start first, so that the batch does not end with a few long ones running on an
    otherwise empty GPU (longest-processing-time-first scheduling; the manifest keeps each line's number)."""
    return sorted(requests, key=expected_ms, reverse=True)


# --- the run ---------------------------------------------------------------------------------------------------

@dataclass
class BatchSettings:
    batch_size: int | None = None


class BatchRun:
    """Generate `requests` (all runnable, outputs not yet there) with `tts`, recording into `manifest`.
    `progress(tally, stats)` is called after every engine step (at most every 0.1 s) and every finished request."""

    def __init__(self, tts, manifest: Manifest, settings: BatchSettings, progress=None):
        self.tts, self.manifest, self.settings = tts, manifest, settings
        self.progress = progress or (lambda tally, stats: None)
        self.tally = Tally()
        self.manifest_lock = threading.Lock()
        self.contexts = ContextCache(tts)
        self.stats = Stats()

    def record(self, req: Request, duration: float | None, error: str | None) -> None:
        with self.manifest_lock:
            self.manifest.append(req, "failed" if error else "ok", duration, error)
        with self.tally.lock:
            if error:
                self.tally.failed.append((req, error))
            else:
                self.tally.ok += 1
                self.tally.audio_s += duration
        self.progress(self.tally, self.stats)

    def _on_event(self, req: Request, writer: "Writer"):
        """The handle's events (from the engine's threads): at its end, write the audio or record the failure."""
        def on_event(event) -> None:
            kind, status = event
            if kind != "end":
                return
            handle = self.handles.pop(id(req))
            if status == FINISHED:
                self.ended(req, writer, handle.pieces, handle.special, handle.truncated)
            else:
                self.ended(req, writer, None, error=handle.error or status)

        return on_event

    def ended(self, req: Request, writer: "Writer", pieces: list[np.ndarray] | None, special: int = 0,
              truncated: int = 0, error: str | None = None) -> None:
        """A request is over: write its audio (`pieces`), or record why it failed."""
        if pieces is None:
            writer.discard(req)
            self.record(req, None, error)
            return
        if truncated:
            with self.tally.lock:
                self.tally.truncated += 1
        writer.submit(req, pieces, special)

    def _add(self, engine, req: Request, writer: "Writer") -> None:
        """Queue one request: its context files are read and encoded once per file (ContextCache)."""
        from dataclasses import replace

        try:
            speech = replace(req.speech, context=tuple(self.contexts.turn(c) for c in req.context))
        except SesemeError as e:
            self.record(req, None, " ".join(str(e).split()))
            return
        writer.prepare(req)
        self.handles[id(req)] = engine.add_request(speech, request_id=req.name, on_event=self._on_event(req, writer))

    def run(self, requests: list[Request]) -> Tally:
        self.tally.total = len(requests)
        started = time.perf_counter()
        batch_size = pick_batch_size(self.tts, self.settings.batch_size, len(requests))
        engine = self.tts.speech_engine(batch_size, pcm16=all_wav(requests))
        writer = Writer(self.tts, self.tally, self.record, writer_threads(requests))
        freeze_after_setup()
        self.handles: dict[int, object] = {}
        self.stats = engine.stats
        self.stats.started = time.perf_counter()
        self.tally.setup_s = self.stats.started - started
        source = iter(longest_first(requests))
        reported = 0.0
        try:
            while True:
                # Keep a batch's worth waiting: a row that frees takes the next request in the same step.
                while engine.queue_depth < batch_size and (req := next(source, None)) is not None:
                    self._add(engine, req, writer)
                if not engine.has_work():  # the source is exhausted too: the top-up above took what was left
                    break
                engine.step()
                if time.perf_counter() - reported > 0.1:
                    self.progress(self.tally, self.stats)
                    reported = time.perf_counter()
            engine.drain()
        finally:
            try:
                engine.close()
            finally:
                writer.close()
        self.tally.batch_size = batch_size
        return self.tally
