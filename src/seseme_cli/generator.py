"""The text-to-speech object users hold: prompt building, the frame loop, and decoding with Mimi.

Generation follows the original SesameAILabs/csm exactly: for each context segment its text frames
`<bos>[speaker]text<eos>`, then its audio frames and an all-zero EOS frame; then the text to speak. Each
step samples one 32-code frame; generation stops at an all-zero frame (dropped) or at the length limit.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

import torch

from .checkpoints import DEFAULT_MODEL, Checkpoint, load_checkpoint
from .errors import InputError
from .kernels import has_cuda_kernels
from .longform import CHUNK_MS, Generation, SpeechJob, Turn
from .model import CsmModel
from .tokenizer import segment_tokens

log = logging.getLogger("seseme")

FRAME_MS = 80
# The EOS test needs the codes on the host; doing it every few frames keeps the loop free of per-frame syncs.
EOS_CHECK_EVERY = 8


@dataclass
class Segment:
    """A turn of context: who spoke, what they said, and the audio (1-D float tensor at `tts.sample_rate`)."""

    speaker: int
    text: str
    audio: torch.Tensor


def build_model(checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype) -> CsmModel:
    if checkpoint.is_random:
        return _random_model(checkpoint, device, dtype)
    with torch.device("meta"):
        model = CsmModel(checkpoint.config)
    weights = {name: w.to(dtype) for name, w in checkpoint.weights.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    if missing or unexpected:
        from .errors import SesemeError

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


def stream_until_eos(step, max_frames: int, num_codebooks: int, device: torch.device, chunk_frames: int,
                     first_chunk_frames: int | None = None):
    """Run `step()` (-> one frame's codes (K,) on `device`) up to `max_frames` times and yield the frames on the
    CPU in chunks of `chunk_frames` (the first one of `first_chunk_frames`, default the same), stopping before
    the first all-zero frame (the original's EOS, dropped).

    Codes are copied to pinned host memory without waiting; the host syncs only once per chunk, so with
    chunks of several frames the GPU runs ahead of the EOS test."""
    pinned = device.type == "cuda"
    host = torch.empty(max_frames, num_codebooks, dtype=torch.long, pin_memory=pinned)
    done = torch.cuda.Event() if pinned else None
    start, size = 0, first_chunk_frames or chunk_frames
    for i in range(max_frames):
        host[i].copy_(step(), non_blocking=pinned)
        if i + 1 - start < size and i + 1 < max_frames:
            continue
        if done is not None:
            done.record()
            done.synchronize()
        new = host[start : i + 1]
        eos = (new == 0).all(dim=1).nonzero()
        if len(eos):
            if int(eos[0]) > 0:
                yield new[: int(eos[0])].clone()
            return
        yield new.clone()
        start, size = i + 1, chunk_frames


def reference_steps(model: CsmModel, tokens, mask, temperature: float, topk: int, generator=None):
    """A `step` callable for `stream_until_eos` that runs the reference model (eager PyTorch)."""
    device = model.c0_head.weight.device
    K = model.cfg.num_codebooks
    state = {
        "tokens": tokens.unsqueeze(0).to(device),
        "mask": mask.unsqueeze(0).to(device),
        "positions": torch.arange(tokens.shape[0], device=device).unsqueeze(0),
        "kv_len": tokens.shape[0],  # the host knows how far the cache is filled: attend over just that
    }
    frame_mask = torch.zeros(1, 1, K + 1, dtype=torch.bool, device=device)
    frame_mask[..., :K] = True
    text_column = torch.zeros(1, 1, dtype=torch.long, device=device)

    def step() -> torch.Tensor:
        codes = model.generate_frame(state["tokens"], state["mask"], state["positions"], temperature, topk, generator,
                                     kv_len=state["kv_len"])
        state["kv_len"] += 1
        state["tokens"] = torch.cat([codes, text_column], dim=1).unsqueeze(1)
        state["mask"] = frame_mask
        state["positions"] = state["positions"][:, -1:] + 1
        return codes[0]

    return step


def generate_frames(model: CsmModel, tokens, mask, max_frames: int, temperature: float, topk: int, generator=None):
    """The reference frame loop for one prompt: codes (frames, K) on the CPU, without the EOS frame."""
    step = reference_steps(model, tokens, mask, temperature, topk, generator)
    device = model.c0_head.weight.device
    chunks = list(stream_until_eos(step, max_frames, model.cfg.num_codebooks, device, EOS_CHECK_EVERY))
    return torch.cat(chunks) if chunks else torch.zeros(0, model.cfg.num_codebooks, dtype=torch.long)


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
        self.model = build_model(checkpoint, self.device, self.dtype)
        self.codec = checkpoint.make_codec(self.device)
        self.sample_rate = self.codec.sample_rate
        self.last_codes: torch.Tensor | None = None
        self.engine = None  # built by setup_caches when the CUDA kernels can run here
        self.uses_engine = self.device.type == "cuda" and has_cuda_kernels()
        if self.device.type == "cuda" and not self.uses_engine:
            log.warning("seseme's CUDA kernels are not available (module built without CUDA?): "
                        "running the plain PyTorch reference path, which is much slower")

    # --- prompt ------------------------------------------------------------------------------------------

    def _text_frames(self, text: str, speaker: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor(segment_tokens(self.tokenizer, speaker, text), dtype=torch.long)
        if int(ids.max()) >= self.config.text_vocab_size:
            raise InputError(f"tokenizer id {int(ids.max())} is outside the model's text vocabulary ({self.config.text_vocab_size})")
        tokens = torch.zeros(len(ids), self.config.num_codebooks + 1, dtype=torch.long)
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        tokens[:, -1], mask[:, -1] = ids, True
        return tokens, mask

    def _audio_frames(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (frames, K) -> their prompt frames, followed by the all-zero audio EOS frame."""
        codes = torch.cat([codes.cpu(), torch.zeros(1, codes.shape[1], dtype=torch.long)])
        tokens = torch.zeros(codes.shape[0], self.config.num_codebooks + 1, dtype=torch.long)
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        tokens[:, :-1], mask[:, :-1] = codes, True
        return tokens, mask

    def encode_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """1-D float audio at `sample_rate` -> Mimi codes (frames, K) int64 on the CPU."""
        if audio.dim() != 1 or audio.numel() == 0:
            raise InputError("context audio must be a non-empty 1-D tensor at the model's sample rate")
        with torch.inference_mode():
            return self.codec.encode(audio.to(self.device, torch.float32)).cpu().T.contiguous()

    def encode_context(self, context=()) -> list[Turn]:
        """Context segments as model input: each Segment's audio is Mimi-encoded; Turns pass through as they
        are. Encode once and pass the Turns to later calls to avoid encoding the same audio again."""
        return [seg if isinstance(seg, Turn) else Turn(seg.speaker, seg.text, self.encode_audio(seg.audio))
                for seg in context]

    def build_prompt(self, text: str, speaker: int, context=()) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt frames (T, K+1) and their mask for `text` spoken by `speaker` after the context turns
        (Segments, whose audio is encoded here, or already encoded Turns)."""
        if not text or not text.strip():
            raise InputError("the text to speak is empty")
        parts = []
        for turn in self.encode_context(context):
            parts += [self._text_frames(turn.text, turn.speaker), self._audio_frames(turn.codes)]
        parts.append(self._text_frames(text, speaker))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    # --- generation --------------------------------------------------------------------------------------

    def setup_caches(self, batch_size: int = 1) -> None:
        """Allocate the static KV caches (and on a GPU all engine memory and CUDA graphs) for up to
        `batch_size` rows, once; generation reuses them."""
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        if self.uses_engine:
            from .engine import Engine

            # Free the old engine's memory (caches, graphs) before sizing and allocating the new one.
            self.engine = None
            self.model.setup_caches(0)
            torch.cuda.empty_cache()
            self.engine = Engine(self.model, batch_size)
        else:
            self.model.setup_caches(batch_size)

    def frame_budget(self, prompt_len: int, max_audio_length_ms: float) -> int:
        window = self.config.max_seq_len
        wanted = max(1, int(max_audio_length_ms // FRAME_MS))
        if prompt_len >= window:
            raise InputError(
                f"the prompt is {prompt_len} frames but the context window is {window}: shorten the text or the context audio"
            )
        if prompt_len + wanted > window:
            log.warning("the prompt leaves room for %d frames (%d ms) of audio; generating at most that", window - prompt_len, (window - prompt_len) * FRAME_MS)
        return min(wanted, window - prompt_len)

    def speech_job(self, text: str, speaker: int = 0, context=(), max_audio_length_ms: float = 90_000,
                   temperature: float = 0.9, topk: int = 50, seed: int | None = None,
                   chunk_ms: float = CHUNK_MS) -> SpeechJob:
        """Check the settings, encode the context once, and plan the text's chunks (see longform)."""
        if topk < 1:
            raise InputError("topk must be at least 1")
        if not temperature >= 0:
            raise InputError("temperature must be >= 0")
        if not text or not text.strip():
            raise InputError("the text to speak is empty")
        seed = secrets.randbits(63) if seed is None else seed
        return SpeechJob(self, text, speaker, self.encode_context(context), max_audio_length_ms, seed, chunk_ms)

    def _ensure_caches(self) -> None:
        if self.model.cache_batch_size < 1 or (self.uses_engine and self.engine is None):
            self.setup_caches(1)

    def generation_codes(self, gen: Generation, temperature: float, topk: int, chunk_frames: int = EOS_CHECK_EVERY,
                         first_chunk_frames: int | None = None):
        """One generation: yield its codes in CPU chunks (n, K) int64, stopping before the EOS frame. Runs on
        the GPU engine (row 0) when it is available, else on the reference model."""
        self._ensure_caches()
        with torch.inference_mode():
            if self.engine is not None:
                self.engine.set_row(0, gen.tokens, gen.mask, temperature, topk, gen.seed)
                step = lambda: self.engine.step(1)[0]  # noqa: E731
            else:
                generator = torch.Generator(self.device).manual_seed(gen.seed)
                step = reference_steps(self.model, gen.tokens, gen.mask, temperature, topk, generator)

        def inference_step() -> torch.Tensor:  # per frame: the caller's thread is not in inference mode between chunks
            with torch.inference_mode():
                return step()

        yield from stream_until_eos(inference_step, gen.max_frames, self.config.num_codebooks, self.device,
                                    chunk_frames, first_chunk_frames)

    def job_codes(self, job: SpeechJob, temperature: float, topk: int, chunk_frames: int = EOS_CHECK_EVERY,
                  first_chunk_frames: int | None = None):
        """Speak a SpeechJob chunk after chunk, yielding CPU code chunks as they come; `last_codes` holds all
        of them at the end."""
        first = first_chunk_frames
        while (gen := job.next_generation()) is not None:
            chunks = []
            for codes in self.generation_codes(gen, temperature, topk, chunk_frames, first):
                chunks.append(codes)
                yield codes
            job.finish(torch.cat(chunks) if chunks else torch.zeros(0, self.config.num_codebooks, dtype=torch.long))
            first = None
        job.warn_if_truncated()
        self.last_codes = job.codes(self.config.num_codebooks)

    def stream_codes(
        self,
        text: str,
        speaker: int = 0,
        context=(),
        max_audio_length_ms: float = 90_000,
        temperature: float = 0.9,
        topk: int = 50,
        seed: int | None = None,
        chunk_frames: int = EOS_CHECK_EVERY,
        first_chunk_frames: int | None = None,
        chunk_ms: float = CHUNK_MS,
    ):
        """Yield the generated codes as they come, in CPU chunks of `chunk_frames` frames (n, 32) int64
        (the first of `first_chunk_frames`), stopping before each EOS frame. A text longer than one chunk of
        `chunk_ms` is spoken chunk by chunk (see longform); `max_audio_length_ms` limits each generation."""
        job = self.speech_job(text, speaker, context, max_audio_length_ms, temperature, topk, seed, chunk_ms)
        yield from self.job_codes(job, temperature, topk, chunk_frames, first_chunk_frames)

    def generate_codes(self, text: str, speaker: int = 0, context=(), max_audio_length_ms: float = 90_000,
                       temperature: float = 0.9, topk: int = 50, seed: int | None = None,
                       chunk_ms: float = CHUNK_MS) -> torch.Tensor:
        """Generate and return the codes (frames, 32) int64 on the CPU, without EOS frames."""
        for _ in self.stream_codes(text, speaker, context, max_audio_length_ms, temperature, topk, seed,
                                   chunk_ms=chunk_ms):
            pass
        return self.last_codes

    def stream(self, text: str, speaker: int = 0, context=(), max_audio_length_ms: float = 90_000,
               temperature: float = 0.9, topk: int = 50, seed: int | None = None, chunk_ms: float = CHUNK_MS,
               first_chunk_frames: int = 1, chunk_frames: int = EOS_CHECK_EVERY):
        """Speak `text` as a stream: yield 1-D float audio chunks at `sample_rate` as frames are generated
        (the first after `first_chunk_frames` frames, then every `chunk_frames`). Concatenated, the chunks
        equal `decode(last_codes)`. Generation runs in a worker thread while this thread decodes, so decoding
        never holds up the next frames. Long text is spoken chunk by chunk, as in `generate`."""
        from .streaming import stream_audio

        job = self.speech_job(text, speaker, context, max_audio_length_ms, temperature, topk, seed, chunk_ms)
        self._ensure_caches()  # here, not in the generation thread: graph capture wants the GPU to itself
        return stream_audio(self, self.job_codes(job, temperature, topk, chunk_frames, first_chunk_frames))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (frames, 32) -> 1-D float audio at `sample_rate` on the CPU. Long sequences are decoded in
        pieces with Mimi's streaming state: the same audio as one piece, in bounded memory."""
        from .streaming import decode_codes

        return decode_codes(self.codec, codes)

    def generate(self, text: str, speaker: int = 0, context=(), max_audio_length_ms: float = 90_000,
                 temperature: float = 0.9, topk: int = 50, seed: int | None = None,
                 chunk_ms: float = CHUNK_MS) -> torch.Tensor:
        """Speak `text` as `speaker`; returns 1-D float audio at `sample_rate` (codes in `last_codes`). Text
        longer than one chunk of `chunk_ms` is split at sentence boundaries and spoken chunk by chunk, each
        with the previous chunks as context, into one seamless audio (see longform)."""
        codes = self.generate_codes(text, speaker, context, max_audio_length_ms, temperature, topk, seed, chunk_ms)
        return self.decode(codes)


def load_csm_1b_optimized(model: str = DEFAULT_MODEL, device: str | None = None, dtype: torch.dtype | None = None, seed: int = 0) -> CSM:
    """Load CSM-1B (or `random` / `tiny-random` / a local checkpoint) ready to generate."""
    return CSM(load_checkpoint(model, seed), device, dtype)
