"""Text tokenizers: a checkpoint's own (Llama-3) tokenizer files, or a built-in byte tokenizer for random models.

Every segment is tokenized as `<|begin_of_text|>[speaker]text<|end_of_text|>`, as the original CSM code does.
"""

from __future__ import annotations

from pathlib import Path

from seseme_cli.errors import SesemeError


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, <bos> = 256, <eos> = 257. Only for random models: it is not CSM's tokenizer."""

    name = "built-in byte tokenizer (random models only)"
    vocab_size = 258
    bos_id, eos_id = 256, 257

    def encode(self, text: str) -> list[int]:
        return [self.bos_id, *text.encode("utf-8"), self.eos_id]


class HFTokenizer:
    """A Hugging Face fast tokenizer (`tokenizer.json`) in a local folder, read by `tokenizers` directly
    (transformers' AutoTokenizer costs seconds of import time for the same object)."""

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception for a missing or malformed file
            raise SesemeError(f"cannot load the tokenizer {path}: {err}") from None
        self.name = f"tokenizer from {folder}"
        names = _special_token_names(folder)
        self.bos_id = self._special_id("<|begin_of_text|>", names.get("bos_token"), path)
        self.eos_id = self._special_id("<|end_of_text|>", names.get("eos_token"), path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def _special_id(self, token: str, fallback: str | None, path: Path) -> int:
        for name in (token, fallback):
            token_id = self._tok.token_to_id(name) if name else None
            if token_id is not None:
                return int(token_id)
        raise SesemeError(f"tokenizer {path} has no {token} token and no fallback special token")

    def encode(self, text: str) -> list[int]:
        return [self.bos_id, *self._tok.encode(text, add_special_tokens=False).ids, self.eos_id]


def _special_token_names(folder: Path) -> dict[str, str]:
    """bos/eos token names from special_tokens_map.json or tokenizer_config.json (a str or {"content": str})."""
    import json

    names: dict[str, str] = {}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            data = json.loads((folder / file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        for key in ("bos_token", "eos_token"):
            value = data.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                names[key] = value
    return names


def has_tokenizer_files(folder: Path) -> bool:
    return (folder / "tokenizer.json").exists()


def segment_tokens(tokenizer, speaker: int, text: str) -> list[int]:
    return tokenizer.encode(f"[{speaker}]{text}")
