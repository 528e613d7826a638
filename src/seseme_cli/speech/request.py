"""What to say and how: the one request type every front end builds (CLI `say`, `batch`, the Python API, the
server) and hands to the engine. Everything is checked here, where a request is made, with the defaults in one
place; nothing downstream validates or defaults again.

Context turns are `Segment`s (audio to encode: 1-D float at the model's rate; numpy arrays, lists and int16
samples are converted here) or `Turn`s (already Mimi codes: what `tts.encode_context` and named voices give).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import numpy as np

from seseme_cli.errors import InputError

FRAME_MS = 80  # one CSM frame = 32 Mimi codes = 80 ms of audio at 24 kHz
SEED_SPACE = 1 << 63

DEFAULT_TEMPERATURE = 0.9
DEFAULT_TOPK = 50
DEFAULT_MAX_AUDIO_MS = 90_000.0
DEFAULT_CHUNK_MS = 10_000.0  # text longer than this much speech is spoken in chunks (speech.longform)
MIN_CHUNK_MS = 2 * FRAME_MS


def _integer(value, what: str, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{what} must be an integer, got {value!r}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise InputError(f"{what} must be {bound}, got {value}")
    return value


def _number(value, what: str, minimum: float, unit: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{what} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < minimum:
        raise InputError(f"{what} must be >= {minimum:g}{unit} (and finite), got {value:g}")
    return value


def _text(value, what: str) -> str:
    if isinstance(value, (bytes, bytearray)):
        raise InputError(f"{what} must be a str, not bytes: decode it first (e.g. data.decode('utf-8'))")
    if not isinstance(value, str):
        raise InputError(f"{what} must be a str, got {type(value).__name__}")
    if "\0" in value:
        raise InputError(f"{what} contains a NUL character")
    return value


def as_audio(audio, what: str = "audio") -> torch.Tensor:
    """1-D float32 CPU tensor from a tensor, numpy array or list of samples. Integer samples are PCM: int16 is
    scaled by 1/32768 (int32 by 1/2^31) so they mean the same as float audio in [-1, 1]."""
    import torch  # here, not at the top: the CLI reads this module's defaults for --help without torch

    if isinstance(audio, (list, tuple)):
        audio = np.asarray(audio, dtype=np.float32)
    if isinstance(audio, np.ndarray):
        audio = torch.from_numpy(np.ascontiguousarray(audio))
    if not isinstance(audio, torch.Tensor):
        raise InputError(f"{what} must be a 1-D tensor, numpy array or list of samples, got {type(audio).__name__}")
    if audio.dim() != 1 or audio.numel() == 0:
        raise InputError(f"{what} must be non-empty and 1-D (mono samples), got shape {tuple(audio.shape)}")
    if audio.dtype in (torch.int16, torch.int32):
        scale = 32768.0 if audio.dtype == torch.int16 else 2147483648.0
        audio = audio.float() / scale
    elif not audio.is_floating_point():
        raise InputError(f"{what} must hold float or int16 samples, got {audio.dtype}")
    audio = audio.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(audio).all()):
        raise InputError(f"{what} holds NaN or infinite samples")
    return audio.contiguous()


@dataclass
class Segment:
    """A turn of context: who spoke, what they said, and the audio (1-D float at `tts.sample_rate`; numpy
    arrays, lists and int16 PCM are accepted and converted)."""

    speaker: int
    text: str
    audio: torch.Tensor

    def __post_init__(self):
        self.speaker = _integer(self.speaker, "Segment.speaker")
        self.text = _text(self.text, "Segment.text")
        self.audio = as_audio(self.audio, "Segment.audio")


@dataclass
class Turn:
    """A context turn as the model takes it: who spoke, what they said, and the Mimi codes (frames, K) int64."""

    speaker: int
    text: str
    codes: torch.Tensor

    def __post_init__(self):
        import torch

        self.speaker = _integer(self.speaker, "Turn.speaker")
        self.text = _text(self.text, "Turn.text")
        if not isinstance(self.codes, torch.Tensor) or self.codes.dim() != 2:
            raise InputError("Turn.codes must be a (frames, codebooks) tensor of Mimi codes")


@dataclass(frozen=True)
class SamplingParams:
    """How codes are drawn: logits / temperature, top-k (ties kept), then a draw from the row's own seeded
    stream. temperature 0 or topk 1 = greedy. seed None = a fresh random seed, drawn once, here."""

    temperature: float = DEFAULT_TEMPERATURE
    topk: int = DEFAULT_TOPK
    seed: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "temperature", _number(self.temperature, "temperature", 0.0))
        object.__setattr__(self, "topk", _integer(self.topk, "topk", 1))
        seed = secrets.randbits(63) if self.seed is None else _integer(self.seed, "seed", 0, SEED_SPACE - 1)
        object.__setattr__(self, "seed", seed)


@dataclass(frozen=True)
class SpeechRequest:
    """One text to speak. `max_audio_ms` limits each generation (a long text is always spoken whole, in chunks
    of at most `chunk_ms` of audio)."""

    text: str
    speaker: int = 0
    context: tuple = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_audio_ms: float = DEFAULT_MAX_AUDIO_MS
    chunk_ms: float = DEFAULT_CHUNK_MS

    def __post_init__(self):
        text = _text(self.text, "text")
        if not text.strip():
            raise InputError("the text to speak is empty")
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "speaker", _integer(self.speaker, "speaker"))
        if not isinstance(self.sampling, SamplingParams):
            raise InputError(f"sampling must be SamplingParams, got {type(self.sampling).__name__}")
        if isinstance(self.context, (Segment, Turn)) or not isinstance(self.context, (list, tuple)):
            raise InputError("context must be a list of Segment (or encoded Turn) objects")
        for i, turn in enumerate(self.context):
            if not isinstance(turn, (Segment, Turn)):
                raise InputError(f"context[{i}] must be a Segment or a Turn, got {type(turn).__name__}")
        object.__setattr__(self, "context", tuple(self.context))
        object.__setattr__(self, "max_audio_ms", _number(self.max_audio_ms, "max_audio_ms", FRAME_MS, " (one frame)"))
        object.__setattr__(self, "chunk_ms", _number(self.chunk_ms, "chunk_ms", MIN_CHUNK_MS, " (two frames)"))

    @classmethod
    def make(cls, text, speaker=0, context=(), max_audio_ms=DEFAULT_MAX_AUDIO_MS, temperature=DEFAULT_TEMPERATURE,
             topk=DEFAULT_TOPK, seed=None, chunk_ms=DEFAULT_CHUNK_MS) -> "SpeechRequest":
        """The flat form the API and the CLI take (`temperature`, `topk`, `seed` beside the rest)."""
        return cls(text, speaker, context, SamplingParams(temperature, topk, seed), max_audio_ms, chunk_ms)

    @property
    def max_frames(self) -> int:
        return max(1, int(self.max_audio_ms // FRAME_MS))
