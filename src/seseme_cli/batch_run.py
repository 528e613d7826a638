"""Generation for `seseme batch`: the scheduler on the engine's rows, and a writer thread that decodes finished
requests in groups (Mimi is batched, and causal, so zero-padding a shorter sequence does not change its
samples), writes each output atomically and appends its manifest record. The frame loop never waits for
decoding or file encoding.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from . import audio_io
from .batch import Manifest, Request
from .errors import SesemeError
from .longform import CHUNK_MS, Turn
from .scheduler import Scheduler, Stats, Work
from .streaming import PIECE_FRAMES, clean_codes, decode_codes

DECODE_FRAMES = 1024  # padded frames per batched decode call (bounds Mimi's activation memory: ~2 GB)
RESERVE_BYTES = 4 << 30  # GPU memory left for Mimi, context encoding and the allocator when sizing the batch
MAX_AUTO_BATCH = 512


@dataclass
class Tally:
    """What happened to this run's requests; updated from the scheduler and the writer thread."""

    total: int = 0
    ok: int = 0
    failed: list[tuple[Request, str]] = field(default_factory=list)
    audio_s: float = 0.0
    special: int = 0  # special ids decoded as code 0
    truncated: int = 0  # requests with a long-form chunk cut at its limit
    batch_size: int = 0
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
    from .engine.runner import bytes_per_row

    free, _ = torch.cuda.mem_get_info(tts.device)
    fits = int((free - RESERVE_BYTES) // bytes_per_row(tts.config, tts.dtype))
    if fits < 1:
        raise SesemeError(f"not enough free GPU memory for one batch row ({free / 1e9:.1f} GB free)")
    return max(1, min(fits, MAX_AUTO_BATCH, todo))


def make_engine(tts, batch_size: int):
    """The GPU engine with CUDA graphs when the kernels run here; else the same frame program eagerly on the
    ops' PyTorch references (CPU, or a GPU without the kernels)."""
    if tts.uses_engine:
        tts.setup_caches(batch_size)
        return tts.engine
    from .engine import Engine

    return Engine(tts.model, batch_size, use_graphs=False)


# --- context audio: read and encoded once per file ---------------------------------------------------------------

class ContextCache:
    def __init__(self, tts, codec_lock: threading.Lock):
        self.tts, self.lock, self.turns = tts, codec_lock, {}

    def turn(self, ctx):
        key = str(ctx.audio)
        if key not in self.turns:
            audio = audio_io.load_audio(ctx.audio, target_sample_rate=self.tts.sample_rate)
            with self.lock:
                self.turns[key] = self.tts.encode_audio(audio)
        return Turn(ctx.speaker, ctx.text, self.turns[key])


# --- decoding and writing in the background -----------------------------------------------------------------------

def decode_group(codec, group: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
    """Decode several code sequences (frames_i, K) in one padded call -> audio_i (frames_i * frame_size,)."""
    longest = max(c.shape[0] for c in group)
    if longest == 0:
        return [torch.zeros(0) for _ in group], 0
    padded = torch.zeros(len(group), group[0].shape[1], longest, dtype=torch.long)
    for i, codes in enumerate(group):
        padded[i, :, : codes.shape[0]] = codes.T
    padded, special = clean_codes(padded, codec.cardinality)
    with torch.inference_mode():
        audio = codec.decode(padded.to(codec.device)).float().cpu()
    return [audio[i, : c.shape[0] * codec.frame_size] for i, c in enumerate(group)], special


@contextlib.contextmanager
def _on_side_stream(device: torch.device):
    """Run this thread's GPU work on its own CUDA stream (nothing on a CPU), next to the frame loop's."""
    if device.type != "cuda":
        yield
        return
    with torch.cuda.device(device), torch.cuda.stream(torch.cuda.Stream(device)):
        yield


class Writer:
    """Decodes finished requests in groups on a worker thread (its own CUDA stream), writes the files in a
    small thread pool, and records each outcome in the manifest."""

    def __init__(self, tts, codec_lock: threading.Lock, tally: Tally, on_done):
        self.tts, self.lock, self.tally, self.on_done = tts, codec_lock, tally, on_done
        self.items: queue.Queue = queue.Queue()
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="seseme-write")
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="seseme-decode", daemon=True)
        self.thread.start()

    def submit(self, req: Request, codes: torch.Tensor) -> None:
        if self.error is not None:
            raise self.error
        self.items.put((req, codes))

    def close(self) -> None:
        self.items.put(None)
        self.thread.join()
        self.pool.shutdown(wait=True)
        if self.error is not None:
            raise self.error

    def _next_group(self):
        first = self.items.get()
        if first is None:
            return None
        group, frames = [first], first[1].shape[0]
        with contextlib.suppress(queue.Empty):
            while frames < DECODE_FRAMES and first[1].shape[0] <= PIECE_FRAMES:
                item = self.items.get_nowait()
                if item is None or item[1].shape[0] > PIECE_FRAMES:
                    self.items.put(item)  # decoded on its own, next
                    break
                group.append(item)
                frames = len(group) * max(c.shape[0] for _, c in group)
        return group

    def _work(self) -> None:
        device = self.tts.codec.device
        try:
            with _on_side_stream(device):
                while (group := self._next_group()) is not None:
                    for (req, _), audio in zip(group, self._decode(group)):
                        self.pool.submit(self._write, req, audio)
        except BaseException as e:  # a bug: surfaced by submit/close in the main thread
            self.error = e

    def _decode(self, group) -> list[torch.Tensor]:
        codes = [c for _, c in group]
        with self.lock:
            if len(group) == 1 and codes[0].shape[0] > PIECE_FRAMES:
                return [decode_codes(self.tts.codec, codes[0])]
            audio, special = decode_group(self.tts.codec, codes)
        with self.tally.lock:
            self.tally.special += special
        return audio

    def _write(self, req: Request, audio: torch.Tensor) -> None:
        try:
            req.output.parent.mkdir(parents=True, exist_ok=True)
            audio_io.write_audio(req.output, audio, self.tts.sample_rate)
        except (SesemeError, OSError) as e:
            self.on_done(req, None, str(e))
            return
        except Exception as e:  # noqa: BLE001 - in a pool thread nothing else would ever report it
            self.on_done(req, None, f"{type(e).__name__}: {e}")
            return
        self.on_done(req, audio.numel() / self.tts.sample_rate, None)


# --- the run ---------------------------------------------------------------------------------------------------

@dataclass
class BatchSettings:
    batch_size: int | None = None
    chunk_ms: float = CHUNK_MS


class BatchRun:
    """Generate `requests` (all runnable, outputs not yet there) with `tts`, recording into `manifest`.
    `progress(tally, stats)` is called after every scheduler round and every finished request."""

    def __init__(self, tts, manifest: Manifest, settings: BatchSettings, progress=None):
        self.tts, self.manifest, self.settings = tts, manifest, settings
        self.progress = progress or (lambda tally, stats: None)
        self.tally = Tally()
        self.codec_lock = threading.Lock()
        self.manifest_lock = threading.Lock()
        self.contexts = ContextCache(tts, self.codec_lock)
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

    def _works(self, requests: list[Request]):
        for req in requests:
            try:
                context = [self.contexts.turn(c) for c in req.context]
                job = self.tts.speech_job(req.text, req.speaker, context, req.max_audio_ms, req.temperature,
                                          req.topk, req.seed, self.settings.chunk_ms)
            except SesemeError as e:
                self.record(req, None, " ".join(str(e).split()))
                continue
            yield Work(req, job, req.temperature, req.topk)

    def run(self, requests: list[Request]) -> Tally:
        self.tally.total = len(requests)
        batch_size = pick_batch_size(self.tts, self.settings.batch_size, len(requests))
        scheduler = Scheduler(make_engine(self.tts, batch_size))
        self.stats = scheduler.stats
        writer = Writer(self.tts, self.codec_lock, self.tally, self.record)

        def finished(work: Work) -> None:
            if work.job.truncated:
                with self.tally.lock:
                    self.tally.truncated += 1
            writer.submit(work.key, work.job.codes(self.tts.config.num_codebooks))

        def failed(work: Work, error: Exception) -> None:
            self.record(work.key, None, " ".join(str(error).split()))

        try:
            scheduler.run(self._works(requests), finished, failed, lambda stats: self.progress(self.tally, stats))
        finally:
            writer.close()
        self.tally.batch_size = batch_size
        return self.tally

