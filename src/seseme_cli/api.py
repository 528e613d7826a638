"""The text-to-speech object users hold (`load_csm_1b_optimized`): the model, its tokenizer and codec, and the
Python API (`generate`, `stream`, `setup_caches`, ...). Every call builds one `SpeechRequest` and drives the one
engine loop (engine.loop.SpeechEngine) on this object's frame engine; nothing here generates by itself.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import numpy as np
import torch

from seseme_cli.audio.stream import decode_codes, warn_special
from seseme_cli.errors import InputError, SesemeError
from seseme_cli.model.checkpoints import DEFAULT_MODEL, Checkpoint, load_checkpoint
from seseme_cli.model.reference import CsmModel
from seseme_cli.ops.kernels import has_cuda_kernels
from seseme_cli.speech.prompt import PromptBuilder
from seseme_cli.speech.request import (DEFAULT_CHUNK_MS, DEFAULT_MAX_AUDIO_MS, DEFAULT_TEMPERATURE, DEFAULT_TOPK,
                                       FRAME_MS, Segment, SpeechRequest, Turn, as_audio)

log = logging.getLogger("seseme")

__all__ = ["CSM", "FRAME_MS", "Segment", "Turn", "build_model", "load_csm_1b_optimized"]


def build_model(checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype) -> CsmModel:
    if checkpoint.is_random:
        return _random_model(checkpoint, device, dtype)
    with torch.device("meta"):
        model = CsmModel(checkpoint.config)
    weights = {name: w.to(dtype) for name, w in checkpoint.weights.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    if missing or unexpected:
        raise SesemeError(f"checkpoint does not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    model.reset_buffers(device)
    return model.to(device).eval()


def _random_model(checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype) -> CsmModel:
    # Seeded, and initialised on the target device (the full model is 1.5 B parameters).
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.device(device):
        torch.manual_seed(checkpoint.seed)
        model = CsmModel(checkpoint.config)
        for emb in (model.text_embed, model.audio_embed):
            torch.nn.init.normal_(emb.weight, std=1.0)
        model.depth_audio_embed.weight.data.copy_(model.audio_embed.weight)
        torch.nn.init.normal_(model.audio_head, std=checkpoint.config.depth.dim ** -0.5)
    return model.to(dtype).eval()


class CSM:
    """A loaded CSM model with its tokenizer and codec. Create it with `load_csm_1b_optimized`."""

    def __init__(self, checkpoint: Checkpoint, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # bf16 on GPUs (what the weights are trained in); fp32 on CPUs, where bf16 matmuls are slow.
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.description = checkpoint.description
        self.is_random = checkpoint.is_random
        self.config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.prompts = PromptBuilder(self.tokenizer, self.config)
        self.model = build_model(checkpoint, self.device, self.dtype)
        self.codec = checkpoint.make_codec(self.device)
        self.sample_rate = self.codec.sample_rate
        self.last_codes: torch.Tensor | None = None
        self.engine = None  # the frame engine (engine.runner.Engine), built by setup_caches
        self._loop = None  # the API's own SpeechEngine over it
        self.streaming = None  # the handle of the latest `stream` (chunks done, frames so far)
        # On a GPU with the kernels: CUDA graphs of the fused kernels. Elsewhere the same frame program runs
        # eagerly on the ops' PyTorch references (the same sampling, so the same codes for a seed).
        self.uses_graphs = self.device.type == "cuda" and has_cuda_kernels()
        if self.device.type == "cuda" and not self.uses_graphs:
            log.warning("seseme's CUDA kernels are not available (module built without CUDA?): "
                        "running the plain PyTorch path, which is much slower; `seseme doctor` says how to fix it")

    # --- context and prompts -----------------------------------------------------------------------------

    def encode_audio(self, audio) -> torch.Tensor:
        """1-D audio at `sample_rate` (tensor, numpy array or list; int16 PCM is scaled) -> Mimi codes (frames, K)
        int64 on the CPU."""
        audio = as_audio(audio, "context audio")
        with torch.inference_mode():
            return self.codec.encode(audio.to(self.device, torch.float32)).cpu().T.contiguous()

    def encode_context(self, context=()) -> list[Turn]:
        """Context segments as model input: each Segment's audio is Mimi-encoded; Turns pass through as they
        are. Encode once and pass the Turns to later calls to avoid encoding the same audio again."""
        if isinstance(context, (Segment, Turn)) or not isinstance(context, (list, tuple)):
            raise InputError("context must be a list of Segment (or encoded Turn) objects")
        turns = []
        for seg in context:
            if isinstance(seg, Turn):
                turns.append(seg)
            elif isinstance(seg, Segment):
                turns.append(Turn(seg.speaker, seg.text, self.encode_audio(seg.audio)))
            else:
                raise InputError(f"a context turn must be a Segment or a Turn, got {type(seg).__name__}")
        return turns

    def build_prompt(self, text: str, speaker: int = 0, context=()) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt frames (T, K+1) and their mask for `text` spoken by `speaker` after the context turns."""
        prompt = self.prompts.prompt(text, speaker, self.encode_context(context))
        return prompt.tokens, prompt.mask

    # --- engine ------------------------------------------------------------------------------------------

    def setup_caches(self, batch_size: int = 1, weights: str | None = None) -> None:
        """Allocate the static KV caches (and on a GPU all engine memory and CUDA graphs) for up to
        `batch_size` rows, once; generation reuses them. weights: "bf16" (as loaded, the default) or "fp8"
        (e4m3 projections with per-channel scales for the decode GEMVs; quantizes this object's weights for
        good, see engine/pack.py); None keeps the current choice."""
        from seseme_cli.engine.pack import WEIGHT_FORMATS, weight_format

        if weights not in (None, *WEIGHT_FORMATS):
            raise InputError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
        if weights == "bf16" and weight_format(self.model) == "fp8":
            raise InputError("the weights were quantized to fp8 by an earlier setup_caches(weights='fp8'); "
                             "load the model again for bf16")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise InputError(f"batch size must be a whole number, got {batch_size!r}")
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        from seseme_cli.engine import Engine

        if self._loop is not None:
            self._loop.close()
            self._loop = None
        # Free the old engine's memory (caches, graphs) before sizing and allocating the new one.
        self.engine = None
        self.model.setup_caches(0)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.engine = Engine(self.model, batch_size, use_graphs=self.uses_graphs, weights=weights)

    def speech_engine(self, max_batch: int | None = None, **options):
        """A new engine loop over this object's frame engine (set up for `max_batch` rows when given); options:
        see engine.loop.SpeechEngine. One loop per CSM at a time (the API's own is closed first)."""
        from seseme_cli.engine.loop import SpeechEngine

        if max_batch is not None and (self.engine is None or self.engine.max_batch != max_batch):
            self.setup_caches(max_batch)
        elif self.engine is None:
            self.setup_caches(1)
        if self._loop is not None:
            self._loop.close()
            self._loop = None
        return SpeechEngine(self, **options)

    def _api_loop(self, first_chunk_frames: int = 1, chunk_frames: int = 8):
        if self._loop is not None and self._loop.broken:  # a failed decode ended its requests; start afresh
            self._loop.close()
            self._loop = None
        if self._loop is None:
            self._loop = self.speech_engine()
        self._loop.set_chunking(first_chunk_frames, chunk_frames)
        return self._loop

    def prepare(self) -> None:
        """Build now what the first request would otherwise wait for: the batch-1 engine, its CUDA graph, the
        audio decoder and its graphs (`say` does this while loading, so first audio is not set-up time)."""
        self._api_loop()

    def close(self) -> None:
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    # --- generation --------------------------------------------------------------------------------------

    def request(self, text: str, speaker: int = 0, context=(), max_audio_length_ms: float = DEFAULT_MAX_AUDIO_MS,
                temperature: float = DEFAULT_TEMPERATURE, topk: int = DEFAULT_TOPK, seed: int | None = None,
                chunk_ms: float = DEFAULT_CHUNK_MS) -> SpeechRequest:
        """The SpeechRequest the other calls build from their arguments (checked here)."""
        return SpeechRequest.make(text, speaker, context, max_audio_length_ms, temperature, topk, seed, chunk_ms)

    def run(self, request: SpeechRequest, progress=None):
        """Speak one request to the end on the API's loop; returns its handle (audio, codes, status).
        `progress(handle)` is called now and then (every 25 frames) while it runs."""
        loop = self._api_loop()
        handle = loop.add_request(request)

        def on_step(out) -> None:
            if progress is not None and loop.stats.steps % 25 == 0:
                progress(handle)

        loop.drain(on_step)
        handle.raise_for_status()
        warn_special(handle.special)
        self.last_codes = handle.codes
        return handle

    def generate_codes(self, text: str, speaker: int = 0, context=(), max_audio_length_ms: float = DEFAULT_MAX_AUDIO_MS,
                       temperature: float = DEFAULT_TEMPERATURE, topk: int = DEFAULT_TOPK, seed: int | None = None,
                       chunk_ms: float = DEFAULT_CHUNK_MS) -> torch.Tensor:
        """Generate and return the codes (frames, 32) int64 on the CPU, without EOS frames."""
        return self.run(self.request(text, speaker, context, max_audio_length_ms, temperature, topk, seed,
                                     chunk_ms)).codes

    def generate(self, text: str, speaker: int = 0, context=(), max_audio_length_ms: float = DEFAULT_MAX_AUDIO_MS,
                 temperature: float = DEFAULT_TEMPERATURE, topk: int = DEFAULT_TOPK, seed: int | None = None,
                 chunk_ms: float = DEFAULT_CHUNK_MS) -> torch.Tensor:
        """Speak `text` as `speaker`; returns 1-D float audio at `sample_rate` (codes in `last_codes`). Text
        longer than one chunk of `chunk_ms` is split at sentence boundaries and spoken chunk by chunk, each
        with the previous chunks as context, into one seamless audio (see speech.longform)."""
        handle = self.run(self.request(text, speaker, context, max_audio_length_ms, temperature, topk, seed, chunk_ms))
        return torch.from_numpy(handle.audio())

    def stream_codes(self, text: str, speaker: int = 0, context=(), max_audio_length_ms: float = DEFAULT_MAX_AUDIO_MS,
                     temperature: float = DEFAULT_TEMPERATURE, topk: int = DEFAULT_TOPK, seed: int | None = None,
                     chunk_frames: int = 8, first_chunk_frames: int | None = None, chunk_ms: float = DEFAULT_CHUNK_MS):
        """Yield the generated codes as they come, in CPU chunks (n, 32) int64 of `chunk_frames` frames (the first
        of `first_chunk_frames`), stopping before each EOS frame; `last_codes` holds all of them at the end."""
        request = self.request(text, speaker, context, max_audio_length_ms, temperature, topk, seed, chunk_ms)
        return self._stream_codes(request, chunk_frames, first_chunk_frames or chunk_frames)

    def _stream_codes(self, request: SpeechRequest, chunk_frames: int, first_chunk_frames: int):
        loop = self._api_loop()
        handle = loop.add_request(request, keep_audio=False, low_latency=True)
        pending, size = [], first_chunk_frames
        try:
            while loop.has_work():
                out = loop.step()
                pending += out.frames.get(handle, [])
                if pending and (len(pending) >= size or handle in out.finished):
                    yield torch.from_numpy(np.stack(pending))
                    pending, size = [], chunk_frames
            loop.drain()
            handle.raise_for_status()
            self.last_codes = handle.codes
        finally:
            if not handle.done:
                loop.abort(handle)
                loop.drain()

    def stream(self, text: str, speaker: int = 0, context=(), max_audio_length_ms: float = DEFAULT_MAX_AUDIO_MS,
               temperature: float = DEFAULT_TEMPERATURE, topk: int = DEFAULT_TOPK, seed: int | None = None,
               chunk_ms: float = DEFAULT_CHUNK_MS, first_chunk_frames: int = 1, chunk_frames: int = 8):
        """Speak `text` as a stream: yield 1-D float audio chunks at `sample_rate` as frames are generated
        (the first after `first_chunk_frames` frames, then chunks that double up to `chunk_frames`).
        Concatenated, the chunks equal `decode(last_codes)`. The engine loop runs in a worker thread while this
        one hands out audio; close the generator to stop early (the request is aborted)."""
        request = self.request(text, speaker, context, max_audio_length_ms, temperature, topk, seed, chunk_ms)
        return self.stream_request(request, first_chunk_frames, chunk_frames)

    def stream_request(self, request: SpeechRequest, first_chunk_frames: int = 1, chunk_frames: int = 8):
        """`stream` for a prebuilt request (e.g. a benchmark's exact one)."""
        loop = self._api_loop(first_chunk_frames, chunk_frames)
        self.streaming = loop.add_request(request, keep_audio=False, low_latency=True)  # progress for the caller
        return self._stream_audio(loop, self.streaming)

    def _stream_audio(self, loop, handle):
        errors: list[BaseException] = []

        def work():
            try:
                with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
                    loop.drain()
            except BaseException as e:  # the handle has failed with it (SpeechEngine.step); re-raised below
                errors.append(e)

        worker = threading.Thread(target=work, name="seseme-generate", daemon=True)
        worker.start()
        try:
            for audio in handle:
                yield torch.from_numpy(audio)
            warn_special(handle.special)
            self.last_codes = handle.codes
        finally:
            loop.abort(handle)
            worker.join()
        if errors:
            raise errors[0]

    def decode(self, codes) -> torch.Tensor:
        """Codes (frames, 32) -> 1-D float audio at `sample_rate` on the CPU. Long sequences are decoded in
        pieces with Mimi's streaming state: the same audio as one piece, in bounded memory."""
        return decode_codes(self.codec, self._checked_codes(codes))

    def _checked_codes(self, codes) -> torch.Tensor:
        if isinstance(codes, np.ndarray):
            codes = torch.from_numpy(codes)
        K, V = self.config.num_codebooks, self.config.audio_vocab_size
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.shape[1] != K:
            shape = tuple(codes.shape) if hasattr(codes, "shape") else type(codes).__name__
            raise InputError(f"codes must be a (frames, {K}) integer tensor, got {shape}")
        if codes.is_floating_point() or codes.dtype == torch.bool:
            raise InputError(f"codes must be integers, got {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= V):
            raise InputError(f"codes must be in 0..{V - 1}, got values from {int(codes.min())} to {int(codes.max())}")
        return codes.long()


def load_csm_1b_optimized(model: str = DEFAULT_MODEL, device: str | None = None, dtype: torch.dtype | None = None,
                          seed: int = 0) -> CSM:
    """Load CSM-1B (or `random` / `tiny-random` / a local checkpoint) ready to generate."""
    return CSM(load_checkpoint(model, seed), device, dtype)
