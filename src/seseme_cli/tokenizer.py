"""Text tokenizers: a checkpoint's own (Llama-3) tokenizer files, or a built-in byte tokenizer for random models.

Every segment is tokenized as `<|begin_of_text|>[speaker]text<|end_of_text|>`, as the original CSM code does.
"""

from __future__ import annotations

from pathlib import Path

from .errors import SesemeError


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, <bos> = 256, <eos> = 257. Only for random models: it is not CSM's tokenizer."""

    name = "built-in byte tokenizer (random models only)"
    vocab_size = 258
    bos_id, eos_id = 256, 257

    def encode(self, text: str) -> list[int]:
        return [self.bos_id, *text.encode("utf-8"), self.eos_id]


class HFTokenizer:
    """A tokenizer saved in Hugging Face format (tokenizer.json / tokenizer_config.json) in a local folder."""

    def __init__(self, folder: str | Path):
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as err:  # transformers raises many types here; all mean "no usable tokenizer"
            raise SesemeError(f"cannot load the tokenizer from {folder}: {err}") from None
        self.name = f"tokenizer from {folder}"
        self.bos_id = self._special_id("<|begin_of_text|>", self._tok.bos_token_id)
        self.eos_id = self._special_id("<|end_of_text|>", self._tok.eos_token_id)
        self.vocab_size = len(self._tok)

    def _special_id(self, token: str, fallback: int | None) -> int:
        token_id = self._tok.convert_tokens_to_ids(token)
        if token_id is None or token_id == self._tok.unk_token_id:
            token_id = fallback
        if token_id is None:
            raise SesemeError(f"tokenizer has no {token} token and no fallback special token")
        return int(token_id)

    def encode(self, text: str) -> list[int]:
        return [self.bos_id, *self._tok.encode(text, add_special_tokens=False), self.eos_id]


def has_tokenizer_files(folder: Path) -> bool:
    return (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()


def segment_tokens(tokenizer, speaker: int, text: str) -> list[int]:
    return tokenizer.encode(f"[{speaker}]{text}")
