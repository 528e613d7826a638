"""Streaming: Mimi decoding with its streaming state, generation overlapped with decoding, and audio sinks that
are written while they grow.

Mimi is causal (causal convolutions, a causal sliding-window transformer), and moshi's MimiModel keeps the
state between calls in streaming mode, so decoding frames chunk by chunk gives the same samples as decoding
them all at once: no seams, no clicks, nothing to crossfade. moshi CUDA-graphs its streaming decoder for a
fixed input shape; our chunks vary in size (a 1-frame first chunk for a fast start, then bigger ones) and a
capture could race with the generator's host syncs in the other thread, so the streaming decoder runs eagerly
(`no_cuda_graph`), on its own CUDA stream.

`stream_audio` runs generation in a worker thread and decodes in the caller's thread: while the worker waits
for the GPU at a chunk's end, the caller decodes the previous chunk, and the frame loop never waits for Mimi.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import struct
import sys
import tempfile
import threading
from pathlib import Path

import torch

from .audio_io import _SUBTYPES, _format_for, _umask
from .errors import InputError, SesemeError

log = logging.getLogger("seseme")

PIECE_FRAMES = 750  # 60 s: longer code sequences are decoded piecewise (bounded activation memory)


def clean_codes(codes: torch.Tensor, cardinality: int) -> tuple[torch.Tensor, int]:
    """Ids >= cardinality (CSM's specials 2048..2050) are not codec codes. Real weights do not sample them
    inside a frame; random weights do, so they become code 0 instead of crashing the codec. Returns
    (codes, how many were replaced)."""
    special = codes >= cardinality
    count = int(special.sum())
    return (codes.masked_fill(special, 0) if count else codes), count


def decode_stream(codec):
    """The codec's own CUDA stream for decoding beside generation, made once per codec: a new stream per call
    would start with an empty allocator pool and fresh library handles on every stream (suspected in the
    ~100 ms time to first audio measured on the H100; not yet re-measured). None on a CPU."""
    if codec.device.type != "cuda":
        return None
    if getattr(codec, "_decode_stream", None) is None:
        codec._decode_stream = torch.cuda.Stream(codec.device)
    return codec._decode_stream


class StreamDecoder:
    """Mimi in streaming mode for one sequence: `decode(codes (n, K))` -> the next n * 1920 samples (1-D CPU
    float32). Use as a context manager; one open StreamDecoder per codec at a time (moshi's state is the
    model's)."""

    def __init__(self, codec):
        self.codec = codec
        self.special = 0  # special ids decoded as 0 so far
        self._stack = contextlib.ExitStack()
        self._stream = decode_stream(codec)

    def __enter__(self) -> "StreamDecoder":
        self._stack.enter_context(self.codec.model.streaming(1))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.shape[0] == 0:
            return torch.zeros(0)
        codes, special = clean_codes(codes, self.codec.cardinality)
        self.special += special
        from moshi.utils.compile import no_cuda_graph

        # Modes are entered per call, not for the whole stream: a suspended generator must not leave the
        # caller's thread in inference mode between chunks.
        with torch.inference_mode(), no_cuda_graph(), self._on_stream():
            return self.codec.model.decode(codes.T[None].to(self.codec.device))[0, 0].float().cpu()

    def _on_stream(self):
        return torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()


def warn_special(count: int) -> None:
    if count:
        log.warning("%d sampled ids are special tokens, not codec codes; decoded them as code 0", count)


def decode_codes(codec, codes: torch.Tensor, piece_frames: int = PIECE_FRAMES) -> torch.Tensor:
    """Codes (frames, K) -> 1-D float audio on the CPU: in one call, or for long sequences piece by piece
    with the streaming state (the same samples, bounded memory)."""
    if codes.shape[0] == 0:
        return torch.zeros(0)
    if codes.shape[0] <= piece_frames:
        codes, special = clean_codes(codes, codec.cardinality)
        warn_special(special)
        with torch.inference_mode():
            return codec.decode(codes.T.to(codec.device)).float().cpu().reshape(-1)
    with StreamDecoder(codec) as dec:
        audio = torch.cat([dec.decode(codes[i : i + piece_frames]) for i in range(0, codes.shape[0], piece_frames)])
    warn_special(dec.special)
    return audio


# --- generation in a worker thread, decoding in the caller's ------------------------------------------------

_DONE = object()


def _produce(chunks, out: queue.Queue, stop: threading.Event, device: torch.device) -> None:
    try:
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            for codes in chunks:
                if stop.is_set():
                    break
                out.put(codes)
        out.put(_DONE)
    except BaseException as e:  # handed to the consumer, which raises it
        out.put(e)
    finally:
        chunks.close()


def in_background(chunks, device: torch.device):
    """Iterate the generator `chunks` in a worker thread; yield its items here. Exceptions are re-raised
    here; closing this generator stops the worker after its current item."""
    items: queue.Queue = queue.Queue()
    stop = threading.Event()
    worker = threading.Thread(target=_produce, args=(chunks, items, stop, device), name="seseme-generate", daemon=True)
    worker.start()
    try:
        while (item := items.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()


def stream_audio(tts, code_chunks):
    """Decode code chunks (from `tts.job_codes`) into audio chunks as they come, generating in the background."""
    with StreamDecoder(tts.codec) as decoder:
        for codes in in_background(code_chunks, tts.device):
            yield decoder.decode(codes)
    warn_special(decoder.special)


def stream_generation(tts, gen, temperature: float = 0.9, topk: int = 50, first_chunk_frames: int = 1,
                      chunk_frames: int = 8):
    """Audio chunks of one prebuilt generation (a `longform.Generation`: prompt, frame limit, seed), e.g. a
    benchmark's exact prompt: time to first audio = time to the first chunk. Close it to stop early."""
    tts._ensure_caches()
    return stream_audio(tts, tts.generation_codes(gen, temperature, topk, chunk_frames, first_chunk_frames))


# --- sinks: audio written while it grows ----------------------------------------------------------------------

def pcm16(audio: torch.Tensor) -> bytes:
    return (audio.clamp(-1.0, 1.0) * 32767.0).round().to(torch.int16).numpy().astype("<i2").tobytes()


def wav_header(sample_rate: int, data_bytes: int = 0xFFFFFFFF) -> bytes:
    """A 44-byte PCM16 mono WAV header; the default sizes 0xFFFFFFFF mean 'unknown length' (a stream)."""
    riff = 0xFFFFFFFF if data_bytes == 0xFFFFFFFF else 36 + data_bytes
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate,
            2 * sample_rate, 2, 16) + b"data" + struct.pack("<I", data_bytes))


class PipeSink:
    """A WAV stream on a binary file object (standard output): an unknown-length header, then PCM16 as it
    comes, flushed after every chunk so a player starts at once."""

    def __init__(self, stream, sample_rate: int):
        self.stream, self.sample_rate, self.samples = stream, sample_rate, 0
        self._write(wav_header(sample_rate))

    def _write(self, data: bytes) -> None:
        try:
            self.stream.write(data)
            self.stream.flush()
        except BrokenPipeError:
            # The reader (a player) went away. Point the descriptor at /dev/null so that Python's own flush at
            # exit does not fail a second time, and say it once.
            with contextlib.suppress(OSError, ValueError, AttributeError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
            raise SesemeError("standard output was closed before the audio ended") from None

    def write(self, audio: torch.Tensor) -> None:
        self._write(pcm16(audio))
        self.samples += audio.numel()

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass


class FileSink:
    """An audio file (format from the suffix) written as it grows into a temp file in the same directory, and
    renamed over `path` by `commit()`: readers never see a partial file; `abort()` removes the temp file."""

    def __init__(self, path: Path, sample_rate: int):
        import soundfile as sf

        self.path, self.sample_rate, self.samples = Path(path), sample_rate, 0
        fmt = _format_for(self.path)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".part", dir=self.path.parent)
        os.close(fd)
        try:
            self.file = sf.SoundFile(self.tmp, "w", sample_rate, 1, _SUBTYPES[fmt], format=fmt)
        except (sf.LibsndfileError, RuntimeError) as e:
            self.abort()
            raise InputError(f"cannot write {self.path}: {e}") from None

    def write(self, audio: torch.Tensor) -> None:
        self.file.write(audio.detach().float().clamp(-1.0, 1.0).numpy())
        self.file.flush()
        self.samples += audio.numel()

    def commit(self) -> None:
        try:
            self.file.close()  # fixes up the header
            os.chmod(self.tmp, 0o666 & ~_umask())
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise InputError(f"cannot write {self.path}: {e.strerror or e}") from None

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.file.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


def open_sink(output: str | Path, sample_rate: int):
    """`-`: a WAV stream on standard output; anything else: an audio file written atomically."""
    if str(output) == "-":
        return PipeSink(sys.stdout.buffer, sample_rate)
    return FileSink(Path(output), sample_rate)
