"""Model shapes as dataclasses, and how they are read from the two checkpoint formats.

CSM is two Llama-style transformers: a backbone over 33-column frames (32 audio codes + 1 text token) and
a small depth decoder that emits codebooks 1..31 of each frame. Every size the code uses comes from here,
so a tiny test model runs through exactly the same code as CSM-1B.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from seseme_cli.errors import InputError, SesemeError

DEFAULT_MODEL = "sesame/csm-1b"  # here (no torch import) so that the CLI's --help can show it


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling in transformers' terms.

    transformers' csm-1b config (factor 32, low 0.125, high 0.5, original max 1024) and torchtune's
    (scale 32, old context 8192, low 1, high 4) put the wavelength thresholds at the same 8192 / 2048 and give
    the same frequencies, so either set of numbers can be stored here as it was read.
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    @classmethod
    def from_torchtune(cls, scale_factor: float = 32, old_context_len: int = 8192) -> "RopeScaling":
        # torchtune's Llama3ScaledRoPE hard-codes low_freq_factor=1, high_freq_factor=4.
        return cls(scale_factor, 1.0, 4.0, old_context_len)


@dataclass(frozen=True)
class TransformerConfig:
    num_layers: int
    dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_dim: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    rope_scaling: RopeScaling | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise SesemeError(f"{self.num_heads} attention heads are not a multiple of {self.num_kv_heads} KV heads")
        if self.head_dim % 2:  # RoPE rotates the two halves of each head
            raise SesemeError(f"head dimension {self.head_dim} is odd; RoPE needs an even one")


@dataclass(frozen=True)
class CsmConfig:
    backbone: TransformerConfig
    depth: TransformerConfig
    text_vocab_size: int = 128_256
    audio_vocab_size: int = 2051  # 2048 Mimi codes + 3 specials
    num_codebooks: int = 32

    @property
    def max_seq_len(self) -> int:
        return self.backbone.max_seq_len


# The original code names its shapes by "flavor". The two real ones are CSM-1B's; the tiny ones are ours,
# used by `--model tiny-random` and by tests that write original-format checkpoints.
_LLAMA3_ROPE = RopeScaling.from_torchtune(32, 8192)
FLAVORS: dict[str, TransformerConfig] = {
    "llama-1B": TransformerConfig(16, 2048, 32, 8, 64, 8192, max_seq_len=2048, rope_scaling=_LLAMA3_ROPE),
    "llama-100M": TransformerConfig(4, 1024, 8, 2, 128, 8192, max_seq_len=33, rope_scaling=_LLAMA3_ROPE),
    "seseme-tiny-backbone": TransformerConfig(2, 64, 4, 2, 16, 128, max_seq_len=2048, rope_scaling=_LLAMA3_ROPE),
    "seseme-tiny-decoder": TransformerConfig(2, 32, 4, 2, 8, 64, max_seq_len=33, rope_scaling=_LLAMA3_ROPE),
}


def csm_1b() -> CsmConfig:
    return CsmConfig(FLAVORS["llama-1B"], FLAVORS["llama-100M"])


def tiny() -> CsmConfig:
    # 258 = 256 bytes + <bos>/<eos> of the built-in byte tokenizer; a few spare rows.
    return CsmConfig(FLAVORS["seseme-tiny-backbone"], FLAVORS["seseme-tiny-decoder"], text_vocab_size=264)


# --- reading config.json ----------------------------------------------------------------------------------

_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean", type(None): "null"}


def read_config_json(path: Path) -> dict:
    """A config.json as a dict, or one InputError naming the file and what is wrong with it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise InputError(f"cannot read {path}: not UTF-8 text") from None
    except json.JSONDecodeError as err:  # also a truncated file: "Expecting ',' delimiter", "Unterminated string"
        raise InputError(f"{path} is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} holds {_JSON_KINDS.get(type(data), 'a value')}, expected a JSON object {{...}}")
    return data


_REQUIRED = object()


class _Fields:
    """One JSON object of a config.json, read with checks.

    A config.json is user input: a missing key or a string where a size belongs must read as one SesemeError
    naming the key (as written, e.g. `depth_decoder_config.hidden_size`), not as a KeyError or ValueError from
    deep inside the loader. The caller adds the file's name.
    """

    def __init__(self, data: dict, where: str = ""):
        self.data, self.where = data, where

    def _get(self, key: str, default):
        value = self.data.get(key)
        if value is None:  # JSON null reads as absent: transformers writes e.g. "head_dim": null for "derive it"
            if default is _REQUIRED:
                raise SesemeError(f"{self.where}{key} is missing")
            return default
        return value

    def _wrong(self, key: str, value, expected: str) -> SesemeError:
        return SesemeError(f"{self.where}{key} is {value!r}, expected {expected}")

    def count(self, key: str, default=_REQUIRED) -> int:
        """A size or count: a whole number >= 1 (2048.0 is accepted as 2048)."""
        value = self._get(key, default)
        # bool is an int in Python, but `"hidden_size": true` is a broken file.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value != int(value) or value < 1:
            raise self._wrong(key, value, "a whole number >= 1")
        return int(value)

    def positive(self, key: str, default=_REQUIRED) -> float:
        value = self._get(key, default)
        # Python's json reads NaN and Infinity; neither is a usable epsilon or RoPE factor.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise self._wrong(key, value, "a number > 0")
        return float(value)

    def text(self, key: str, default=_REQUIRED) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise self._wrong(key, value, "a string")
        return value

    def section(self, key: str, default=_REQUIRED) -> "_Fields":
        value = self._get(key, default)
        if not isinstance(value, dict):
            raise self._wrong(key, value, "an object {...}")
        return _Fields(value, f"{self.where}{key}.")


def from_original_config(cfg: dict) -> CsmConfig:
    """The original repo's config.json: {"backbone_flavor", "decoder_flavor", "text_vocab_size", ...}."""
    fields = _Fields(cfg)
    flavors = fields.text("backbone_flavor", "llama-1B"), fields.text("decoder_flavor", "llama-100M")
    unknown = [name for name in flavors if name not in FLAVORS]
    if unknown:
        raise SesemeError(f"unknown model flavor {unknown[0]!r} (known: {', '.join(FLAVORS)})")
    num_codebooks = fields.count("audio_num_codebooks", 32)
    return CsmConfig(
        backbone=FLAVORS[flavors[0]],
        depth=replace(FLAVORS[flavors[1]], max_seq_len=num_codebooks + 1),
        text_vocab_size=fields.count("text_vocab_size", 128_256),
        audio_vocab_size=fields.count("audio_vocab_size", 2051),
        num_codebooks=num_codebooks,
    )


def _rope_from_hf(cfg: _Fields) -> tuple[float, RopeScaling | None]:
    # transformers 4.x: rope_theta + rope_scaling; 5.x: rope_parameters holds both.
    params = cfg.section("rope_parameters" if cfg.data.get("rope_parameters") else "rope_scaling", {})
    theta = params.positive("rope_theta", cfg.positive("rope_theta", 10_000.0))
    rope_type = params.text("rope_type", params.text("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise SesemeError(f"unsupported RoPE type {rope_type!r} (CSM uses 'llama3')")
    scaling = RopeScaling(
        params.positive("factor"),
        params.positive("low_freq_factor"),
        params.positive("high_freq_factor"),
        params.count("original_max_position_embeddings"),
    )
    return theta, scaling


def _transformer_from_hf(cfg: _Fields) -> TransformerConfig:
    theta, scaling = _rope_from_hf(cfg)
    heads, dim = cfg.count("num_attention_heads"), cfg.count("hidden_size")
    return TransformerConfig(
        num_layers=cfg.count("num_hidden_layers"),
        dim=dim,
        num_heads=heads,
        num_kv_heads=cfg.count("num_key_value_heads", heads),
        head_dim=cfg.count("head_dim", dim // heads),  # a derived 0 is refused like a stored one
        ffn_dim=cfg.count("intermediate_size"),
        max_seq_len=cfg.count("max_position_embeddings"),
        norm_eps=cfg.positive("rms_norm_eps", 1e-5),
        rope_theta=theta,
        rope_scaling=scaling,
    )


def from_transformers_config(cfg: dict) -> CsmConfig:
    """A transformers `CsmConfig` config.json (4.x or 5.x)."""
    fields = _Fields(cfg)
    model_type = fields.text("model_type")
    if model_type != "csm":
        raise SesemeError(f"model_type is {model_type!r}, expected 'csm' (not a CSM checkpoint)")
    depth_cfg = fields.section("depth_decoder_config")
    config = CsmConfig(
        backbone=_transformer_from_hf(fields),
        depth=_transformer_from_hf(depth_cfg),
        text_vocab_size=fields.count("text_vocab_size"),
        audio_vocab_size=fields.count("vocab_size"),
        num_codebooks=fields.count("num_codebooks"),
    )
    if depth_cfg.count("backbone_hidden_size", config.backbone.dim) != config.backbone.dim:
        raise SesemeError("the depth decoder's backbone_hidden_size differs from the backbone's hidden_size")
    return config


def transformers_codec_config(cfg: dict) -> dict:
    """The Mimi codec's part of a transformers config.json (its fields are read by audio.codec)."""
    return _Fields(cfg).section("codec_config").data
