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


@torch.inference_mode()
def generate_frames(model: CsmModel, tokens, mask, max_frames: int, temperature: float, topk: int, generator=None):
    """The frame loop for one prompt: tokens/mask (T, K+1) -> codes (frames, K) on the model's device, stopping
    before the first all-zero frame or after `max_frames`."""
    device = model.c0_head.weight.device
    K = model.cfg.num_codebooks
    tokens, mask = tokens.unsqueeze(0).to(device), mask.unsqueeze(0).to(device)
    positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0)
    frame_mask = torch.zeros(1, 1, K + 1, dtype=torch.bool, device=device)
    frame_mask[..., :K] = True
    text_column = torch.zeros(1, 1, dtype=torch.long, device=device)
    frames = torch.zeros(max_frames, K, dtype=torch.long, device=device)
    checked = 0
    for i in range(max_frames):
        codes = model.generate_frame(tokens, mask, positions, temperature, topk, generator)
        frames[i] = codes[0]
        tokens, mask = torch.cat([codes, text_column], dim=1).unsqueeze(1), frame_mask
        positions = positions[:, -1:] + 1
        if (i + 1) % EOS_CHECK_EVERY == 0 or i + 1 == max_frames:
            eos = (frames[checked : i + 1] == 0).all(dim=1).nonzero()
            if len(eos):
                return frames[: checked + int(eos[0])]
            checked = i + 1
    return frames


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

    # --- prompt ------------------------------------------------------------------------------------------

    def _text_frames(self, text: str, speaker: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor(segment_tokens(self.tokenizer, speaker, text), dtype=torch.long)
        if int(ids.max()) >= self.config.text_vocab_size:
            raise InputError(f"tokenizer id {int(ids.max())} is outside the model's text vocabulary ({self.config.text_vocab_size})")
        tokens = torch.zeros(len(ids), self.config.num_codebooks + 1, dtype=torch.long)
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        tokens[:, -1], mask[:, -1] = ids, True
        return tokens, mask

    def _audio_frames(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if audio.dim() != 1 or audio.numel() == 0:
            raise InputError("context audio must be a non-empty 1-D tensor at the model's sample rate")
        codes = self.codec.encode(audio.to(self.device, torch.float32)).cpu()  # (K, frames)
        codes = torch.cat([codes, torch.zeros(codes.shape[0], 1, dtype=codes.dtype)], dim=1)  # + audio EOS frame
        tokens = torch.zeros(codes.shape[1], self.config.num_codebooks + 1, dtype=torch.long)
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        tokens[:, :-1], mask[:, :-1] = codes.T, True
        return tokens, mask

    def build_prompt(self, text: str, speaker: int, context=()) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt frames (T, K+1) and their mask for `text` spoken by `speaker` after the context segments."""
        if not text or not text.strip():
            raise InputError("the text to speak is empty")
        parts = []
        for seg in context:
            parts += [self._text_frames(seg.text, seg.speaker), self._audio_frames(seg.audio)]
        parts.append(self._text_frames(text, speaker))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    # --- generation --------------------------------------------------------------------------------------

    def setup_caches(self, batch_size: int = 1) -> None:
        """Allocate the static KV caches for up to `batch_size` rows (once; generation reuses them)."""
        self.model.setup_caches(batch_size)

    def _frame_budget(self, prompt_len: int, max_audio_length_ms: float) -> int:
        window = self.config.max_seq_len
        wanted = max(1, int(max_audio_length_ms // FRAME_MS))
        if prompt_len >= window:
            raise InputError(
                f"the prompt is {prompt_len} frames but the context window is {window}: shorten the text or the context audio"
            )
        if prompt_len + wanted > window:
            log.warning("the prompt leaves room for %d frames (%d ms) of audio; generating at most that", window - prompt_len, (window - prompt_len) * FRAME_MS)
        return min(wanted, window - prompt_len)

    @torch.inference_mode()
    def generate_codes(
        self,
        text: str,
        speaker: int = 0,
        context=(),
        max_audio_length_ms: float = 90_000,
        temperature: float = 0.9,
        topk: int = 50,
        seed: int | None = None,
    ) -> torch.Tensor:
        """Generate and return the codes (frames, 32) int64 on the CPU, without the final EOS frame."""
        if topk < 1:
            raise InputError("topk must be at least 1")
        if temperature < 0:
            raise InputError("temperature must be >= 0")
        tokens, mask = self.build_prompt(text, speaker, context)
        max_frames = self._frame_budget(tokens.shape[0], max_audio_length_ms)
        if self.model.cache_batch_size < 1:
            self.setup_caches(1)
        generator = torch.Generator(self.device).manual_seed(secrets.randbits(63) if seed is None else seed)

        frames = generate_frames(self.model, tokens, mask, max_frames, temperature, topk, generator)
        self.last_codes = frames.cpu()
        return self.last_codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (frames, 32) -> 1-D float audio at `sample_rate` on the CPU."""
        if codes.shape[0] == 0:
            return torch.zeros(0)
        # Ids 2048..2050 are CSM's specials, not Mimi codes. Real weights do not sample them inside a frame;
        # random weights do, so they are decoded as code 0 rather than crashing the codec.
        special = codes >= self.codec.cardinality
        if special.any():
            log.warning("%d sampled ids are special tokens, not codec codes; decoding them as code 0", int(special.sum()))
            codes = codes.masked_fill(special, 0)
        with torch.inference_mode():
            return self.codec.decode(codes.T.to(self.device)).float().cpu().reshape(-1)

    def generate(self, text: str, speaker: int = 0, context=(), max_audio_length_ms: float = 90_000,
                 temperature: float = 0.9, topk: int = 50, seed: int | None = None) -> torch.Tensor:
        """Speak `text` as `speaker`; returns 1-D float audio at `sample_rate` (codes in `last_codes`)."""
        codes = self.generate_codes(text, speaker, context, max_audio_length_ms, temperature, topk, seed)
        return self.decode(codes)


def load_csm_1b_optimized(model: str = DEFAULT_MODEL, device: str | None = None, dtype: torch.dtype | None = None, seed: int = 0) -> CSM:
    """Load CSM-1B (or `random` / `tiny-random` / a local checkpoint) ready to generate."""
    return CSM(load_checkpoint(model, seed), device, dtype)
