"""Streaming: Mimi decoding with its streaming state, generation overlapped with decoding, and audio sinks that
are written while they grow.

Mimi is causal (causal convolutions, a causal sliding-window transformer), and moshi's MimiModel keeps the
state between calls in streaming mode, so decoding frames chunk by chunk gives the same samples as decoding
them all at once: no seams, no clicks, nothing to crossfade.

On a GPU an eager streaming decode of one frame is hundreds of tiny kernels launched from Python (~25 ms of host
time on the H100), and entering streaming mode allocates the whole state again (~3.5 ms). So each codec keeps one
batch-1 streaming state for good (`_KeptState`), detached from the model between sessions so that one-shot
`codec.decode` works, and two CUDA graphs over it, captured once: one frame of `model.decode` ((1, K, 1) codes ->
(1, 1, frame_size) audio: quantizer, upsampling, decoder transformer, SEANet decoder), and `reset_streaming()`,
replayed when a session starts. A chunk of n frames is n replays of the frame graph. Replays are right only
because every state update on this path is in place (`[:] =`, `scatter_`, `add_`; checked in moshi 0.2.13: conv
`previous`, transposed-conv `partial`, the ring KV cache and its `end_offset`, attention and transformer offsets,
`exec_mask`); the one exception, replicate padding's `first` flag, is reassigned, so such a model stays eager.
moshi's own per-module CUDA graphs are switched off (`no_cuda_graph`): ours covers the whole decode. The capture
happens in the caller's thread when the codec's first StreamDecoder is entered, before generation starts, so it
never races the generation thread (`decode_codes`, for whole sequences, never captures). On a CPU,
if capture fails, and for chunks over GRAPH_MAX_FRAMES (long pieces), decoding is eager, one call per chunk, on
the same state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch

from seseme_cli.audio.files import GuardedFile, pcm16, umask, wav_header, writable_format, write_error
from seseme_cli.errors import SesemeError

log = logging.getLogger("seseme")

PIECE_FRAMES = 750  # 60 s: longer code sequences are decoded piecewise (bounded activation memory)
# Longer chunks decode in one eager call: n replays of the 1-frame graph cost n x its GPU time (hundreds of tiny
# kernels), one eager call ~25 ms of launches plus one batched pass. Estimated crossover, not measured.
GRAPH_MAX_FRAMES = 32


def clean_codes(codes: torch.Tensor, cardinality: int) -> tuple[torch.Tensor, int]:
    """Ids >= cardinality (CSM's specials 2048..2050) are not codec codes. Real weights do not sample them
    inside a frame; random weights do, so they become code 0 instead of crashing the codec. Returns
    (codes, how many were replaced)."""
    special = codes >= cardinality
    count = int(special.sum())
    return (codes.masked_fill(special, 0) if count else codes), count


def decode_stream(codec):
    """The codec's own CUDA stream for decoding beside generation, made once per codec (a new stream per call
    would start with an empty allocator pool), at the highest priority torch offers: when decode and generation
    kernels are both queued, the GPU schedules the decode's first. None on a CPU."""
    if codec.device.type != "cuda":
        return None
    if getattr(codec, "_decode_stream", None) is None:
        highest = min(torch.cuda.Stream.priority_range())  # lower is higher; torch clamps to what it supports
        codec._decode_stream = torch.cuda.Stream(codec.device, priority=highest)
    return codec._decode_stream


def _on(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


class _KeptState:
    """Mimi's batch-1 streaming state for one codec, kept between StreamDecoder sessions: attached to the model
    and reset during a session, detached between them. On a GPU, once captured, the frame and reset graphs over
    it (see the module docstring); `frame` is None while decoding is eager."""

    def __init__(self, model, stream):
        self.model, self.stream = model, stream
        self.frame = self.reset_graph = None
        self.tried = stream is None  # nothing to capture on a CPU
        with _on(stream):
            model.streaming_forever(1)
        self.states = model.get_streaming_state()
        self.detach()

    def attach(self) -> None:
        if self.model.is_streaming:
            raise RuntimeError("Mimi is already streaming: one open StreamDecoder per codec at a time")
        self.model.set_streaming_state(self.states)

    def detach(self) -> None:
        self.model.set_streaming_state(dict.fromkeys(self.states))  # no state: one-shot decode works

    def capture(self) -> None:
        """Capture the graphs (attached, once; no other work of this thread may run meanwhile). A failure
        leaves decoding eager, said once."""
        from moshi.modules.conv import StreamingConv1d
        from moshi.utils.compile import no_compile, no_cuda_graph

        self.tried = True
        frame, reset = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        try:
            if any(isinstance(m, StreamingConv1d) and m.pad_mode == "replicate" for m in self.model.decoder.modules()):
                raise RuntimeError("replicate padding replaces its state flag instead of updating it in place")
            # no_compile: moshi torch.compiles its RoPE lazily on a GPU; that must not happen inside a capture.
            with torch.inference_mode(), no_cuda_graph(), no_compile():
                with _on(self.stream):
                    self.codes = torch.zeros(1, self.model.num_codebooks, 1, dtype=torch.long, device=self.stream.device)
                    self.model.decode(self.codes)  # warm-up: library handles, workspaces, the codebooks' lazy cache
                # thread_local: our capture must not make CUDA calls of other threads fail.
                with torch.cuda.graph(frame, stream=self.stream, capture_error_mode="thread_local"):
                    self.audio = self.model.decode(self.codes)
                with torch.cuda.graph(reset, pool=frame.pool(), stream=self.stream, capture_error_mode="thread_local"):
                    self.model.reset_streaming()
        except RuntimeError as e:  # torch's capture errors, out of memory, replicate padding
            log.warning("Mimi streaming decode runs eagerly (slower first audio): no CUDA graph: %s", e)
            return
        # Capturing ran nothing: the state is as the warm-up left it, and reset() comes next.
        self.frame, self.reset_graph = frame, reset

    def reset(self) -> None:
        """Reset the attached state in place, on the decode stream, ahead of this session's decodes."""
        with torch.inference_mode(), _on(self.stream):
            if self.reset_graph is not None:
                self.reset_graph.replay()  # one launch instead of ~500 small ops (~3 ms of host time)
            else:
                self.model.reset_streaming()

    def decode_frames(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (n, K) long on the GPU -> (n * frame_size,) float32 on the GPU: one graph replay per frame.
        Call in inference mode on the decode stream."""
        out = torch.empty(codes.shape[0], self.audio.shape[-1], device=codes.device)
        for i, frame in enumerate(codes):
            self.codes[0, :, 0].copy_(frame)
            self.frame.replay()
            out[i].copy_(self.audio[0, 0])
        return out.view(-1)


class StreamDecoder:
    """Mimi in streaming mode for one sequence: `decode(codes (n, K))` -> the next n * 1920 samples (1-D CPU
    float32). Use as a context manager; one open StreamDecoder per codec at a time (moshi's state is the
    model's). On a GPU the codec's first one with `capture` (the default) captures the CUDA graphs when entered:
    enter it in the thread that decodes, before generation starts."""

    def __init__(self, codec, capture: bool = True):
        self.codec = codec
        self.special = 0  # special ids decoded as 0 so far
        self.capture = capture
        self._stream = decode_stream(codec)
        self._kept: _KeptState | None = None

    def __enter__(self) -> "StreamDecoder":
        kept = getattr(self.codec, "_stream_state", None)
        if kept is None:
            kept = _KeptState(self.codec.model, self._stream)
            self.codec._stream_state = kept
        kept.attach()
        try:
            if self.capture and not kept.tried:
                kept.capture()
            kept.reset()
        except BaseException:
            kept.detach()
            raise
        self._kept = kept
        return self

    def __exit__(self, *exc) -> None:
        self._kept.detach()
        self._kept = None

    @property
    def graphed(self) -> bool:
        """Whether chunks of up to GRAPH_MAX_FRAMES frames decode by CUDA graph replays (else eagerly)."""
        return self._kept is not None and self._kept.frame is not None

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.shape[0] == 0:
            return torch.zeros(0)
        codes, special = clean_codes(codes, self.codec.cardinality)
        self.special += special
        from moshi.utils.compile import no_compile, no_cuda_graph

        # Modes are entered per call, not for the whole stream: a suspended generator must not leave the
        # caller's thread in inference mode between chunks.
        with torch.inference_mode(), _on(self._stream):
            codes = codes.to(self.codec.device, torch.long)
            if self.graphed and codes.shape[0] <= GRAPH_MAX_FRAMES:
                return self._kept.decode_frames(codes).cpu()
            # no_compile: a torch.compile of moshi's RoPE per new chunk length would stall the stream for seconds.
            with no_cuda_graph(), no_compile():
                return self.codec.model.decode(codes.T[None])[0, 0].float().cpu()


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
    # No capture: long pieces decode eagerly (the graphs are for one-frame chunks).
    with StreamDecoder(codec, capture=False) as dec:
        audio = torch.cat([dec.decode(codes[i : i + piece_frames]) for i in range(0, codes.shape[0], piece_frames)])
    warn_special(dec.special)
    return audio


# --- sinks: audio written while it grows ----------------------------------------------------------------------

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
        except OSError as e:
            # Point the descriptor at /dev/null so that Python's own flush at exit does not fail a second time
            # (with a traceback), and say it once.
            with contextlib.suppress(OSError, ValueError, AttributeError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
            if isinstance(e, BrokenPipeError):  # the reader (a player) went away
                raise SesemeError("standard output was closed before the audio ended") from None
            raise SesemeError(f"cannot write standard output: {e.strerror or e}") from None

    def write(self, audio: torch.Tensor) -> None:
        self._write(pcm16(audio.detach().float().cpu().numpy()).tobytes())
        self.samples += audio.numel()

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass


class FileSink:
    """An audio file (format from the suffix, see audio.files.SUPPORTED_FORMATS) written as it grows into a temp
    file in the same directory, and renamed over `path` by `commit()`: readers never see a partial file; `abort()`
    removes the temp file. Every failure (disk full included) is one InputError naming `path`, after which the temp
    file is gone."""

    def __init__(self, path: Path, sample_rate: int):
        import soundfile as sf

        self.path, self.sample_rate, self.samples = Path(path), sample_rate, 0
        self.file = self.raw = self.tmp = None
        fmt, subtype = writable_format(self.path)
        try:
            fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".part", dir=self.path.parent)
            self.raw = os.fdopen(fd, "r+b")
            # Through a file object, not the path: libsndfile's own writes do not all report a full disk.
            self.guard = GuardedFile(self.raw)
            self.file = sf.SoundFile(self.guard, "w", sample_rate, 1, subtype, format=fmt)
            self.guard.check()
        except (sf.LibsndfileError, OSError, RuntimeError) as e:
            self.abort()
            raise write_error(self.path, self._reason(e)) from None

    def _reason(self, e: BaseException) -> BaseException:
        guard = getattr(self, "guard", None)
        return guard.error if guard is not None and guard.error is not None else e

    def write(self, audio: torch.Tensor) -> None:
        import soundfile as sf

        try:
            self.file.write(audio.detach().float().clamp(-1.0, 1.0).cpu().numpy())
            self.file.flush()
            self.guard.check()
        except (sf.LibsndfileError, OSError, RuntimeError) as e:
            self.abort()
            raise write_error(self.path, self._reason(e)) from None
        self.samples += audio.numel()

    def commit(self) -> None:
        import soundfile as sf

        try:
            self.file.close()  # fixes up the header
            self.guard.check()
            self.raw.close()
            os.chmod(self.tmp, 0o666 & ~umask())  # mkstemp makes 0600; give the file the mode a plain open() would
            os.replace(self.tmp, self.path)
        except (sf.LibsndfileError, OSError, RuntimeError) as e:
            self.abort()
            raise write_error(self.path, self._reason(e)) from None
        self.tmp = None

    def abort(self) -> None:
        """Remove the temp file (nothing to do after commit or a first abort)."""
        for f in (self.file, self.raw):
            with contextlib.suppress(Exception):  # a full disk fails the close too: the file goes anyway
                if f is not None:
                    f.close()
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            self.tmp = None


def open_sink(output: str | Path, sample_rate: int):
    """`-`: a WAV stream on standard output; anything else: an audio file written atomically."""
    if str(output) == "-":
        return PipeSink(sys.stdout.buffer, sample_rate)
    return FileSink(Path(output), sample_rate)
