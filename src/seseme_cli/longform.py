"""Long-form text: split it into chunks that each fit one generation, and speak them in order as one voice.

A CSM generation is bounded by its 2048-position window and, by default, by `CHUNK_MS` of audio. A longer text
is split at sentence boundaries (then clause, then word boundaries for very long sentences) into chunks whose
estimated speech fits comfortably in `chunk_ms`. Chunk i is prompted like a conversation turn that follows:
the caller's context turns (always kept: they define the voice), then the chunks already spoken, as turns of
their text and their *generated codes* (never re-encoded audio), then chunk i's text. When the window cannot
hold it all, the oldest spoken chunks are dropped first.

The chunks join without a seam: they are one continuous code sequence, and Mimi decodes it with its streaming
state (or in one piece), so the audio at a chunk border is decoded exactly like any other frame border; there
is nothing to crossfade and no gap is inserted (each chunk ends with the model's own trailing silence).

`SpeechJob` is the plan for one text: the single-stream API and the batch scheduler both drive it the same way
(`next_generation()` -> generate -> `finish(codes)` -> ... until `next_generation()` is None).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch

log = logging.getLogger("seseme")

FRAME_MS = 80
CHUNK_MS = 10_000  # default longest audio of one chunk
CHARS_PER_SECOND = 15.0  # a conversational speaking rate, to size chunks from text
FILL = 0.7  # a chunk's text is sized to ~70% of chunk_ms, so a slow reading still ends before the limit
SEED_SPACE = 1 << 63

_SENTENCE_END = re.compile(r"(?<=[.!?…。！？])[\"'”’)\]]*\s+(?=[^a-z\s])")
_CLAUSE_END = re.compile(r"(?<=[,;:，；：])\s+|\s+(?=[—–-]\s)")


@dataclass
class Turn:
    """A context turn as the model takes it: who spoke, what they said, and the Mimi codes (frames, K) int64."""

    speaker: int
    text: str
    codes: torch.Tensor


def max_chunk_chars(chunk_ms: float) -> int:
    return max(20, int(CHARS_PER_SECOND * chunk_ms / 1000 * FILL))


def _pack(pieces: list[str], max_chars: int) -> list[str]:
    """Join consecutive pieces with spaces into chunks of at most max_chars (a longer piece stays alone)."""
    chunks: list[str] = []
    for piece in pieces:
        if chunks and len(chunks[-1]) + 1 + len(piece) <= max_chars:
            chunks[-1] += " " + piece
        else:
            chunks.append(piece)
    return chunks


def _split_words(text: str, max_chars: int) -> list[str]:
    return _pack(text.split(), max_chars)  # a single word longer than max_chars stays whole: never cut a word


def _split_sentence(sentence: str, max_chars: int) -> list[str]:
    if len(sentence) <= max_chars:
        return [sentence]
    pieces = []
    for clause in _CLAUSE_END.split(sentence):
        pieces += [clause] if len(clause) <= max_chars else _split_words(clause, max_chars)
    return _pack([p for p in pieces if p], max_chars)


def split_text(text: str, max_chars: int) -> list[str]:
    """Split `text` into chunks of at most `max_chars` characters at sentence boundaries, packing short
    sentences together; a sentence longer than max_chars is split at clause boundaries (, ; : dashes), and a
    clause still too long at word boundaries (a word is never cut). Whitespace runs collapse to one space."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return [text] if text else []
    pieces = []
    for sentence in _SENTENCE_END.split(text):
        pieces += _split_sentence(sentence.strip(), max_chars)
    return _pack([p for p in pieces if p], max_chars)


@dataclass
class Generation:
    """One generation: a prompt (T, K+1) with its mask, its frame limit and its sampling seed."""

    tokens: torch.Tensor
    mask: torch.Tensor
    max_frames: int
    seed: int


@dataclass
class SpeechJob:
    """Everything needed to speak one text, one generation per chunk. `tts` provides build_prompt,
    frame_budget and the config; `context` holds Turns (already encoded)."""

    tts: object
    text: str
    speaker: int = 0
    context: list[Turn] = field(default_factory=list)
    max_audio_ms: float = 90_000
    seed: int = 0
    chunk_ms: float = CHUNK_MS
    chunks: list[str] = field(init=False)
    spoken: list[torch.Tensor] = field(init=False, default_factory=list)  # codes of each finished chunk
    truncated: int = field(init=False, default=0)  # chunks that hit their frame limit

    def __post_init__(self):
        from .errors import InputError

        if not (self.chunk_ms >= 2 * FRAME_MS):
            raise InputError(f"the chunk length must be at least {2 * FRAME_MS} ms, got {self.chunk_ms}")
        self.chunks = split_text(self.text, max_chunk_chars(self.chunk_ms))
        if not self.chunks:
            raise InputError("the text to speak is empty")
        self._limit: int | None = None

    @property
    def done(self) -> bool:
        return len(self.spoken) == len(self.chunks)

    def next_generation(self) -> Generation | None:
        """The prompt for the next chunk, or None when every chunk has been spoken."""
        if self.done:
            return None
        i = len(self.spoken)
        text = self.chunks[i]
        if len(self.chunks) == 1:  # one generation: exactly the plain API's prompt and limits
            tokens, mask = self.tts.build_prompt(text, self.speaker, self.context)
            frames = self.tts.frame_budget(tokens.shape[0], self.max_audio_ms)
        else:
            wanted = max(1, int(min(self.max_audio_ms, self.chunk_ms) // FRAME_MS))
            tokens, mask = self._fit_prompt(text, wanted)
            frames = self.tts.frame_budget(tokens.shape[0], wanted * FRAME_MS)
        self._limit = frames
        return Generation(tokens, mask, frames, (self.seed + i) % SEED_SPACE)

    def _fit_prompt(self, text: str, frames: int):
        """Caller context + as many of the latest spoken chunks as fit with `frames` of room, + `text`."""
        window = self.tts.config.max_seq_len
        history = [Turn(self.speaker, t, c) for t, c in zip(self.chunks, self.spoken)]
        while True:
            tokens, mask = self.tts.build_prompt(text, self.speaker, self.context + history)
            if tokens.shape[0] + frames <= window or not history:
                return tokens, mask
            history = history[1:]

    def finish(self, codes: torch.Tensor) -> None:
        """Record the codes (frames, K) generated for the current chunk."""
        if len(self.chunks) > 1 and self._limit is not None and codes.shape[0] >= self._limit:
            self.truncated += 1
        self.spoken.append(codes)
        self._limit = None

    def warn_if_truncated(self) -> None:
        if self.truncated:
            limit = min(self.max_audio_ms, self.chunk_ms)
            log.warning("%d of %d text chunks reached the %.0f ms chunk limit before the model ended them; their "
                        "ends may be cut (random weights never end)", self.truncated, len(self.chunks), limit)

    def codes(self, num_codebooks: int = 32) -> torch.Tensor:
        """All the codes spoken so far, (frames, K)."""
        return torch.cat(self.spoken) if self.spoken else torch.zeros(0, num_codebooks, dtype=torch.long)
