"""Model shapes as dataclasses, and how they are read from the two checkpoint formats.

CSM is two Llama-style transformers: a backbone over 33-column frames (32 audio codes + 1 text token) and
a small depth decoder that emits codebooks 1..31 of each frame. Every size the code uses comes from here,
so a tiny test model runs through exactly the same code as CSM-1B.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import SesemeError


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


def from_original_config(cfg: dict) -> CsmConfig:
    """The original repo's config.json: {"backbone_flavor", "decoder_flavor", "text_vocab_size", ...}."""
    try:
        backbone, decoder = FLAVORS[cfg.get("backbone_flavor", "llama-1B")], FLAVORS[cfg.get("decoder_flavor", "llama-100M")]
    except KeyError as err:
        raise SesemeError(f"unknown model flavor {err.args[0]!r} in config.json (known: {', '.join(FLAVORS)})") from None
    num_codebooks = int(cfg.get("audio_num_codebooks", 32))
    return CsmConfig(
        backbone=backbone,
        depth=replace(decoder, max_seq_len=num_codebooks + 1),
        text_vocab_size=int(cfg.get("text_vocab_size", 128_256)),
        audio_vocab_size=int(cfg.get("audio_vocab_size", 2051)),
        num_codebooks=num_codebooks,
    )


def _rope_from_hf(cfg: dict) -> tuple[float, RopeScaling | None]:
    # transformers 4.x: rope_theta + rope_scaling; 5.x: rope_parameters holds both.
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10_000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise SesemeError(f"unsupported RoPE type {rope_type!r} in config.json (CSM uses 'llama3')")
    scaling = RopeScaling(
        float(params["factor"]),
        float(params["low_freq_factor"]),
        float(params["high_freq_factor"]),
        int(params["original_max_position_embeddings"]),
    )
    return theta, scaling


def _transformer_from_hf(cfg: dict) -> TransformerConfig:
    theta, scaling = _rope_from_hf(cfg)
    heads = int(cfg["num_attention_heads"])
    return TransformerConfig(
        num_layers=int(cfg["num_hidden_layers"]),
        dim=int(cfg["hidden_size"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        ffn_dim=int(cfg["intermediate_size"]),
        max_seq_len=int(cfg["max_position_embeddings"]),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        rope_theta=theta,
        rope_scaling=scaling,
    )


def from_transformers_config(cfg: dict) -> CsmConfig:
    """A transformers `CsmConfig` config.json (4.x or 5.x)."""
    if cfg.get("model_type") != "csm":
        raise SesemeError(f"config.json has model_type {cfg.get('model_type')!r}, expected 'csm'")
    depth_cfg = cfg["depth_decoder_config"]
    config = CsmConfig(
        backbone=_transformer_from_hf(cfg),
        depth=_transformer_from_hf(depth_cfg),
        text_vocab_size=int(cfg["text_vocab_size"]),
        audio_vocab_size=int(cfg["vocab_size"]),
        num_codebooks=int(cfg["num_codebooks"]),
    )
    if int(depth_cfg.get("backbone_hidden_size", config.backbone.dim)) != config.backbone.dim:
        raise SesemeError("config.json: depth decoder's backbone_hidden_size differs from the backbone's hidden_size")
    return config
