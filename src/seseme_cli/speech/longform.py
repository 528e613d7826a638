"""Long-form text: split it into chunks that each fit one generation, and speak them in order as one voice.

A CSM generation is bounded by its 2048-position window and, by default, by `CHUNK_MS` of audio. A longer text
is split at sentence boundaries (pysbd's rules: "Dr.", "e.g.", decimals and initials do not end a sentence),
then clause, then word boundaries for very long sentences, into chunks whose
estimated speech fits comfortably in `chunk_ms`. Chunk i is prompted like a conversation turn that follows:
the caller's context turns (always kept: they define the voice), then the chunks already spoken, as turns of
their text and their *generated codes* (never re-encoded audio), then chunk i's text. When the window cannot
hold it all, the oldest spoken chunks are dropped first.

The chunks join without a seam: they are one continuous code sequence, and Mimi decodes it with its streaming
state (or in one piece), so the audio at a chunk border is decoded exactly like any other frame border; there
is nothing to crossfade and no gap is inserted (each chunk ends with the model's own trailing silence).

`SpeechJob` is the plan for one request: the engine loop drives it (`next_generation()` -> generate ->
`finish(codes)` -> ... until `next_generation()` is None). Each turn's prompt frames are built once and a chunk's
prompt keeps the newest spoken chunks that fit, found walking back from the newest: a chunk costs time in
proportion to the window, not to the text spoken so far.

A chunk's prompt mostly repeats what the row's KV cache already holds: while the previous chunk was generated the
cache took its prompt and then each of its frames. When the new prompt keeps the same oldest chunk as the previous
one (nothing had to be dropped), it is exactly that: the previous prompt, the chunk's codes, the audio EOS frame,
the new text. `Generation.cached` says how many leading frames the cache holds, so the engine prefills only the
rest (~20 rows instead of the ~150-400 of a prompt with a 10 s chunk in it).
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass

import torch

from seseme_cli.errors import InputError
from seseme_cli.speech.prompt import Frames, PromptBuilder
from seseme_cli.speech.request import FRAME_MS, SEED_SPACE, SpeechRequest, Turn

log = logging.getLogger("seseme")

CHARS_PER_SECOND = 15.0  # a conversational speaking rate, to size chunks from text
FILL = 0.7  # a chunk's text is sized to ~70% of chunk_ms, so a slow reading still ends before the limit

_CLAUSE_END = re.compile(r"(?<=[,;:，；：])\s+|\s+(?=[—–-]\s)")


def max_chunk_chars(chunk_ms: float) -> int:
    return max(20, int(CHARS_PER_SECOND * chunk_ms / 1000 * FILL))


@functools.lru_cache(maxsize=1)
def _segmenter():
    import pysbd

    return pysbd.Segmenter(language="en", clean=False)


# pysbd's time grows with the square of its input (20 s for 100 KB), so long text goes to it in blocks of about
# BLOCK_CHARS, cut where a sentence surely ends: after a lowercase word of 4+ letters and . ! or ?, before a
# capital (never "Dr. Smith", "e.g. the", "3.5", "J. R. R."). Text with no such end for 4 blocks is cut at any
# ". X" (rarely wrong, and only at a block border). Blocks keep it linear: 240 KB in about 3 s.
BLOCK_CHARS = 2000
_CANDIDATE = re.compile(r"(?<=[.!?])\s+(?=[\"'“‘(\[]?[A-Z])")
_SURE = re.compile(r"[a-z]{4}[.!?]$")


def _blocks(text: str) -> list[str]:
    blocks, start, fallback = [], 0, None
    for match in _CANDIDATE.finditer(text):
        size = match.start() - start
        if size >= BLOCK_CHARS and _SURE.search(text, max(start, match.start() - 5), match.start()):
            cut = match
        elif size >= 4 * BLOCK_CHARS and fallback is not None:
            cut = fallback
        else:
            fallback = match if size >= BLOCK_CHARS else fallback
            continue
        blocks.append(text[start : cut.start()])
        start, fallback = cut.end(), None
    blocks.append(text[start:])
    return blocks


def sentences(text: str) -> list[str]:
    """The sentences of `text` (whitespace already collapsed), by pysbd's English rules."""
    return [s.strip() for block in _blocks(text) for s in _segmenter().segment(block) if s.strip()]


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
    for sentence in sentences(text):
        pieces += _split_sentence(sentence, max_chars)
    return _pack([p for p in pieces if p], max_chars)


@dataclass
class Generation:
    """One generation: a prompt (T, K+1) with its mask, its frame limit and its sampling seed."""

    tokens: torch.Tensor
    mask: torch.Tensor
    max_frames: int
    seed: int
    # Leading prompt frames that the request's cache row already holds from its previous chunk's generation, in
    # the same positions (0: prefill it all). It stops one frame short of everything the cache holds: the last
    # frame of the previous chunk is only in the cache if the frame step after it ran (the engine reads frames
    # one step late, except when it waits for a listener's first frame), so it is prefilled again.
    cached: int = 0

    @property
    def prefill_rows(self) -> int:
        """Prefill rows this generation needs after its cached frames (its last frame is the first step's input)."""
        return self.tokens.shape[0] - self.cached - 1


class SpeechJob:
    """Everything needed to speak one request, one generation per chunk. `context`: the request's turns,
    already encoded (Turns)."""

    def __init__(self, request: SpeechRequest, context: list[Turn], prompts: PromptBuilder):
        self.request, self.prompts = request, prompts
        self.chunks = split_text(request.text, max_chunk_chars(request.chunk_ms))
        if not self.chunks:
            raise InputError("the text to speak is empty")
        self.context = list(context)
        self._context_frames = [prompts.turn_frames(t) for t in self.context] if len(self.chunks) > 1 else None
        self.spoken: list[torch.Tensor] = []  # codes of each finished chunk
        self._spoken_frames: list[Frames] = []  # their prompt frames (text + codes), built once
        self.truncated = 0  # chunks that hit their frame limit
        self._limit: int | None = None
        self._oldest_kept: int | None = None  # the oldest spoken chunk in the previous chunk's prompt

    @property
    def done(self) -> bool:
        return len(self.spoken) == len(self.chunks)

    @property
    def chunk_index(self) -> int:
        return len(self.spoken)

    def next_generation(self) -> Generation | None:
        """The prompt for the next chunk, or None when every chunk has been spoken."""
        if self.done:
            return None
        i, req = len(self.spoken), self.request
        text, cached = self.chunks[i], 0
        if len(self.chunks) == 1:  # one generation: exactly the plain API's prompt and limits
            prompt = self.prompts.prompt(text, req.speaker, self.context)
            frames = self.prompts.frame_budget(len(prompt), req.max_frames)
        else:
            wanted = max(1, int(min(req.max_audio_ms, req.chunk_ms) // FRAME_MS))
            own = self.prompts.text_frames(text, req.speaker)
            prompt, oldest = self._fit_prompt(own, wanted)
            frames = self.prompts.frame_budget(len(prompt), wanted)
            if i and oldest == self._oldest_kept:
                # The previous prompt + the chunk just spoken's codes and EOS frame + this text: the cache holds
                # all of it up to the spoken chunk's last frame (see Generation.cached), which goes again.
                cached = len(prompt) - len(own) - 2
            self._oldest_kept = oldest
        self._limit = frames
        return Generation(prompt.tokens, prompt.mask, frames, (req.sampling.seed + i) % SEED_SPACE, cached)

    def _fit_prompt(self, own: Frames, frames: int) -> tuple[Frames, int]:
        """Caller context + as many of the latest spoken chunks as fit with `frames` of room, + `own` (the text's
        frames); and the index of the oldest spoken chunk kept (len(spoken) when none is)."""
        room = self.prompts.window - frames - len(own) - sum(len(f) for f in self._context_frames)
        kept: list[Frames] = []
        for spoken in reversed(self._spoken_frames):
            if len(spoken) > room:
                break
            kept.append(spoken)
            room -= len(spoken)
        return Frames.join([*self._context_frames, *reversed(kept), own]), len(self._spoken_frames) - len(kept)

    def finish(self, codes: torch.Tensor) -> None:
        """Record the codes (frames, K) generated for the current chunk."""
        if len(self.chunks) > 1:
            if self._limit is not None and codes.shape[0] >= self._limit:
                self.truncated += 1
            turn = Turn(self.request.speaker, self.chunks[len(self.spoken)], codes)
            self._spoken_frames.append(self.prompts.turn_frames(turn))
        self.spoken.append(codes)
        self._limit = None

    def warn_if_truncated(self) -> None:
        if self.truncated:
            limit = min(self.request.max_audio_ms, self.request.chunk_ms)
            log.warning("%d of %d text chunks reached the %.0f ms chunk limit before the model ended them; their "
                        "ends may be cut (random weights never end)", self.truncated, len(self.chunks), limit)

    def codes(self, num_codebooks: int = 32) -> torch.Tensor:
        """All the codes spoken so far, (frames, K)."""
        return torch.cat(self.spoken) if self.spoken else torch.zeros(0, num_codebooks, dtype=torch.long)
