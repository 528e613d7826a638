"""Prompt frames, as the original SesameAILabs/csm builds them: for each context turn its text frames
`<bos>[speaker]text<eos>`, then its audio frames and an all-zero audio EOS frame; then the text to speak.

A frame has K+1 columns (K audio codes + 1 text token) and a mask saying which columns count. Each turn's frames
are built once (`turn_frames`) so that long-form chunking can assemble prompts from cached pieces.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from seseme_cli.errors import InputError
from seseme_cli.model.tokenizer import segment_tokens
from seseme_cli.speech.request import FRAME_MS, Turn

log = logging.getLogger("seseme")


@dataclass
class Frames:
    """Prompt frames (T, K+1) int64 and their mask (T, K+1) bool."""

    tokens: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @staticmethod
    def join(parts: list["Frames"]) -> "Frames":
        return Frames(torch.cat([p.tokens for p in parts]), torch.cat([p.mask for p in parts]))


class PromptBuilder:
    """Turns text and context turns into prompt frames for one model (its tokenizer and shapes)."""

    def __init__(self, tokenizer, config):
        self.tokenizer = tokenizer
        self.num_codebooks = config.num_codebooks
        self.text_vocab_size = config.text_vocab_size
        self.window = config.max_seq_len

    def text_frames(self, text: str, speaker: int) -> Frames:
        ids = torch.tensor(segment_tokens(self.tokenizer, speaker, text), dtype=torch.long)
        if int(ids.max()) >= self.text_vocab_size:
            raise InputError(f"tokenizer id {int(ids.max())} is outside the model's text vocabulary ({self.text_vocab_size})")
        tokens = torch.zeros(len(ids), self.num_codebooks + 1, dtype=torch.long)
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        tokens[:, -1], mask[:, -1] = ids, True
        return Frames(tokens, mask)

    def audio_frames(self, codes: torch.Tensor) -> Frames:
        """Codes (frames, K) -> their prompt frames, followed by the all-zero audio EOS frame."""
        if codes.dim() != 2 or codes.shape[1] != self.num_codebooks:
            raise InputError(f"context codes must be (frames, {self.num_codebooks}), got {tuple(codes.shape)}")
        codes = torch.cat([codes.cpu().long(), torch.zeros(1, codes.shape[1], dtype=torch.long)])
        tokens = torch.zeros(codes.shape[0], self.num_codebooks + 1, dtype=torch.long)
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        tokens[:, :-1], mask[:, :-1] = codes, True
        return Frames(tokens, mask)

    def turn_frames(self, turn: Turn) -> Frames:
        return Frames.join([self.text_frames(turn.text, turn.speaker), self.audio_frames(turn.codes)])

    def prompt(self, text: str, speaker: int, context: list[Turn] = ()) -> Frames:
        """The whole prompt for `text` after the encoded context turns."""
        return Frames.join([*(self.turn_frames(t) for t in context), self.text_frames(text, speaker)])

    def frame_budget(self, prompt_len: int, max_frames: int, warn: bool = True) -> int:
        """How many frames a generation after a prompt of `prompt_len` frames may produce (at most max_frames)."""
        if prompt_len >= self.window:
            raise InputError(f"the prompt is {prompt_len} frames but the context window is {self.window}: "
                             "shorten the text or the context audio")
        room = self.window - prompt_len
        if max_frames > room and warn:
            log.warning("the prompt leaves room for %d frames (%d ms) of audio; generating at most that",
                        room, room * FRAME_MS)
        return min(max_frames, room)
