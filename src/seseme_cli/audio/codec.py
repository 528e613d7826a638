"""The Mimi audio codec: 24 kHz audio <-> 32 codebooks of 2048 codes at 12.5 frames per second.

One implementation, moshi's `MimiModel`, because it can stream-decode (`with codec.model.streaming(batch):`)
and transformers' cannot. Weights come in two namings: moshi's own file (kyutai's
tokenizer-e351c8d8-checkpoint125.safetensors) and the transformers naming used under `codec_model.` in a
transformers CSM checkpoint; `transformers_to_moshi_state` converts the second into the first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn

from seseme_cli.errors import InputError, SesemeError

# A very small Mimi for CPU tests: real frame size (1920 samples) and codebooks (32 x 2048), tiny widths.
_TINY = {
    "num_filters": 4, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
    "num_key_value_heads": 2, "intermediate_size": 64, "codebook_dim": 16,
    "vector_quantization_hidden_dimension": 16, "upsample_groups": 32,
}


def _unsupported(what: str) -> SesemeError:
    return SesemeError(f"unsupported Mimi config: {what}")


@dataclass(frozen=True)
class MimiSpec:
    """The transformers MimiConfig fields that shape the network. Defaults = MimiConfig's = kyutai's Mimi;
    a CSM config.json may leave any of them out."""

    sampling_rate: int = 24000
    frame_rate: float | None = None  # None: derived as transformers does (see from_transformers)
    audio_channels: int = 1
    hidden_size: int = 512
    num_filters: int = 64
    num_residual_layers: int = 1
    upsampling_ratios: tuple[int, ...] = (8, 6, 5, 4)
    kernel_size: int = 7
    last_kernel_size: int = 3
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    use_causal_conv: bool = True
    pad_mode: str = "constant"
    compress: int = 2
    trim_right_ratio: float = 1.0
    codebook_size: int = 2048
    codebook_dim: int = 256
    num_quantizers: int = 32
    use_conv_shortcut: bool = False
    vector_quantization_hidden_dimension: int = 256
    num_semantic_quantizers: int = 1
    upsample_groups: int = 512
    num_hidden_layers: int = 8
    intermediate_size: int = 2048
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "gelu"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int = 250
    layer_scale_initial_scale: float = 0.01
    attention_bias: bool = False

    @classmethod
    def from_transformers(cls, codec_config: dict) -> "MimiSpec":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in codec_config.items() if k in known and v is not None}
        kw["upsampling_ratios"] = tuple(kw.get("upsampling_ratios", cls.upsampling_ratios))
        # transformers 5.x moves rope_theta into rope_parameters.
        rope = codec_config.get("rope_parameters") or {}
        if "rope_theta" not in kw and "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        for scaling in (rope, codec_config.get("rope_scaling") or {}):
            if scaling.get("rope_type", scaling.get("type", "default")) != "default":
                raise _unsupported("RoPE scaling")
        # Older transformers store `frame_rate`, newer `_frame_rate` (often null); when absent transformers
        # derives it from the encoder hop followed by its stride-2 downsample.
        kw["frame_rate"] = kw.get("frame_rate") or codec_config.get("_frame_rate") or \
            kw.get("sampling_rate", cls.sampling_rate) / (math.prod(kw["upsampling_ratios"]) * 2)
        kw.setdefault("head_dim", kw.get("hidden_size", cls.hidden_size) //
                      kw.get("num_attention_heads", cls.num_attention_heads))
        spec = cls(**kw)
        spec._check()
        return spec

    @property
    def encoder_frame_rate(self) -> float:
        return self.sampling_rate / math.prod(self.upsampling_ratios)

    def _check(self) -> None:
        # Each check is a place where moshi's network has no switch for what transformers allows.
        if not self.use_causal_conv or self.trim_right_ratio != 1.0:
            raise _unsupported("non-causal convolutions")
        if self.pad_mode not in ("constant", "replicate"):
            raise _unsupported(f"pad_mode {self.pad_mode!r}")
        if self.hidden_act != "gelu":
            raise _unsupported(f"hidden_act {self.hidden_act!r} (moshi uses exact GELU)")
        if self.attention_bias:
            raise _unsupported("attention_bias (moshi's attention has no biases)")
        if self.head_dim * self.num_attention_heads != self.hidden_size:
            raise _unsupported("head_dim * num_attention_heads != hidden_size")
        if self.num_attention_heads % self.num_key_value_heads:
            raise _unsupported("num_attention_heads not a multiple of num_key_value_heads")
        if self.codebook_dim != self.vector_quantization_hidden_dimension:
            raise _unsupported("codebook_dim != vector_quantization_hidden_dimension")
        ratio = self.encoder_frame_rate / self.frame_rate
        # transformers' resampler is kernel 2r, stride 2; moshi's is kernel 2r, stride r: equal only for r = 2.
        if ratio not in (1, 2):
            raise _unsupported(f"encoder/frame rate ratio {ratio}")
        if ratio == 2 and self.upsample_groups != self.hidden_size:
            raise _unsupported("upsample_groups != hidden_size (moshi's upsampler is channel-wise)")

    def moshi_config(self) -> dict:
        """The `mimi_config` dict that moshi.models.loaders.get_mimi takes."""
        d = self.hidden_size
        return {
            "sample_rate": self.sampling_rate,
            "channels": self.audio_channels,
            "frame_rate": self.frame_rate,
            "seanet": {
                "channels": self.audio_channels, "dimension": d, "causal": True, "n_filters": self.num_filters,
                "n_residual_layers": self.num_residual_layers, "activation": "ELU", "compress": self.compress,
                "dilation_base": self.dilation_growth_rate, "disable_norm_outer_blocks": 0,
                "kernel_size": self.kernel_size, "residual_kernel_size": self.residual_kernel_size,
                "last_kernel_size": self.last_kernel_size, "norm": "none", "pad_mode": self.pad_mode,
                "ratios": list(self.upsampling_ratios), "true_skip": not self.use_conv_shortcut,
            },
            "quantizer": {
                "dimension": self.vector_quantization_hidden_dimension, "n_q": self.num_quantizers,
                "n_q_semantic": self.num_semantic_quantizers, "bins": self.codebook_size,
                "input_dimension": d, "output_dimension": d,
            },
            "transformer": {
                "d_model": d, "num_heads": self.num_attention_heads, "num_layers": self.num_hidden_layers,
                "kv_repeat": self.num_attention_heads // self.num_key_value_heads,
                "causal": True, "layer_scale": self.layer_scale_initial_scale,
                # moshi's `context` = transformers' `sliding_window`: a query sees keys with 0 <= q - k < window
                # (25 Hz steps: 10 s). transformers 5.x applies it; 4.57's Mimi ignores it (plain causal mask).
                "context": self.sliding_window, "conv_layout": True, "max_period": self.rope_theta,
                "gating": "none", "norm": "layer_norm", "positional_embedding": "rope",
                "dim_feedforward": self.intermediate_size, "input_dimension": d, "output_dimensions": [d],
            },
        }

    def build(self, device="cpu"):
        """An uninitialised moshi MimiModel with these shapes, fp32, eval mode, on CPU then moved to `device`."""
        from moshi.models.loaders import get_mimi  # moshi is heavy to import; only codec users pay for it

        # filename=None: get_mimi builds without loading anything (it would torch.load non-safetensors files).
        model = get_mimi(None, self.moshi_config(), device="cpu", num_codebooks=self.num_quantizers)
        if self.norm_eps != 1e-5:  # moshi's "layer_norm" hard-codes eps=1e-5
            for m in model.modules():
                if isinstance(m, nn.LayerNorm):
                    m.eps = self.norm_eps
        return model.to(device).eval()


# ---------------------------------------------------------------- transformers -> moshi names

_LAYER_NAMES = {  # transformer layer sub-names, transformers -> moshi
    "self_attn.o_proj.weight": "self_attn.out_projs.0.weight",
    "mlp.fc1.weight": "linear1.weight",
    "mlp.fc2.weight": "linear2.weight",
    "input_layernorm.weight": "norm1.weight",
    "input_layernorm.bias": "norm1.bias",
    "post_attention_layernorm.weight": "norm2.weight",
    "post_attention_layernorm.bias": "norm2.bias",
    "self_attn_layer_scale.scale": "layer_scale_1.scale",
    "mlp_layer_scale.scale": "layer_scale_2.scale",
}
# transformers 5.x nests Mimi's halves in memory (`encoder.encoder_seanet.layers`, ...); its checkpoints keep
# the flat 4.x layout. Prefixes of the nested layout -> flat, so both state dicts load.
_NESTED_PREFIXES = {
    "encoder.encoder_seanet.": "encoder.", "encoder.encoder_transformer.": "encoder_transformer.",
    "encoder.downsample.": "downsample.", "decoder.upsample.": "upsample.",
    "decoder.decoder_transformer.": "decoder_transformer.", "decoder.decoder_seanet.": "decoder.",
}
_CODEBOOK_NAMES = {"embed_sum": "embedding_sum", "cluster_usage": "cluster_usage", "initialized": "_initialized"}
_RVQ_NAMES = {"semantic_residual_vector_quantizer": "rvq_first", "acoustic_residual_vector_quantizer": "rvq_rest"}


def _rope_rows_to_moshi(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' q/k rows -> moshi's, within each head.

    moshi's RoPE rotates interleaved pairs (2i, 2i+1); transformers' rotates halves (i, i + hd/2). The
    transformers conversion script permutes moshi -> transformers with
    `w.view(H, hd/2, 2, D).transpose(1, 2)`: transformers row i = moshi row 2i, row hd/2 + i = moshi row 2i+1.
    This is its inverse: moshi row 2i = transformers row i, moshi row 2i+1 = transformers row hd/2 + i.
    """
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _moshi_name(name: str, transposed: set[int]) -> str | None:
    """The moshi name of one transformers tensor (q/k/v_proj excluded), or None if it has no place."""
    parts = name.split(".")
    head, leaf = name.rsplit(".", 1)
    if parts[0] in ("encoder", "decoder") and parts[1] == "layers" and head.endswith(".conv"):
        # transformers wraps nn.Conv1d once (`x.conv`), moshi twice (`x.conv.conv` / `x.convtr.convtr`).
        is_tr = parts[0] == "decoder" and int(parts[2]) in transposed and len(parts) == 5
        module = f"{parts[0]}.model.{'.'.join(parts[2:-2])}"
        return f"{module}.{'convtr.convtr' if is_tr else 'conv.conv'}.{leaf}"
    if head == "downsample.conv":  # moshi: ConvDownsample1d > StreamingConv1d > NormConv1d > nn.Conv1d
        return f"downsample.conv.conv.conv.{leaf}"
    if head == "upsample.conv":
        return f"upsample.convtr.convtr.convtr.{leaf}"
    if parts[0] in ("encoder_transformer", "decoder_transformer") and parts[1] == "layers":
        sub = _LAYER_NAMES.get(".".join(parts[3:]))
        return sub and f"{parts[0]}.transformer.layers.{parts[2]}.{sub}"
    if parts[0] == "quantizer" and parts[1] in _RVQ_NAMES:
        rvq = f"quantizer.{_RVQ_NAMES[parts[1]]}"
        if head in (f"quantizer.{parts[1]}.input_proj", f"quantizer.{parts[1]}.output_proj"):
            return f"{rvq}.{parts[2]}.{leaf}"
        if len(parts) == 6 and parts[2] == "layers" and parts[4] == "codebook" and leaf in _CODEBOOK_NAMES:
            return f"{rvq}.vq.layers.{parts[3]}._codebook.{_CODEBOOK_NAMES[leaf]}"
    return None


def transformers_to_moshi_state(state: dict[str, torch.Tensor], codec_config: dict) -> dict[str, torch.Tensor]:
    """Rename a transformers MimiModel state dict into the names of moshi's MimiModel.state_dict().

    Raises SesemeError naming the tensors it cannot place; it never drops one silently.
    """
    spec = MimiSpec.from_transformers(codec_config)
    # Decoder layout: conv, then per ratio [ELU, ConvTranspose, resblocks...], then ELU, conv.
    stride = 2 + spec.num_residual_layers
    transposed = {2 + i * stride for i in range(len(spec.upsampling_ratios))}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}  # layer prefix -> {"q": ..., "k": ..., "v": ...}
    unknown = []
    for name, t in state.items():
        for nested, flat in _NESTED_PREFIXES.items():
            if name.startswith(nested):
                name = flat + name[len(nested):]
                break
        parts = name.split(".")
        is_qkv = (len(parts) == 6 and parts[0] in ("encoder_transformer", "decoder_transformer")
                  and parts[3] == "self_attn" and parts[4] in ("q_proj", "k_proj", "v_proj") and parts[5] == "weight")
        if is_qkv:
            qkv.setdefault(f"{parts[0]}.transformer.layers.{parts[2]}.", {})[parts[4][0]] = t
            continue
        try:
            new = _moshi_name(name, transposed)
        except (IndexError, ValueError):  # malformed name, e.g. a non-numeric layer index
            new = None
        if new is None:
            unknown.append(name)
        else:
            out[new] = t

    for prefix, d in qkv.items():
        if set(d) != {"q", "k", "v"}:
            raise SesemeError(f"Mimi weights: {prefix} lacks some of q/k/v_proj")
        q = _rope_rows_to_moshi(d["q"], spec.num_attention_heads)
        k = _rope_rows_to_moshi(d["k"], spec.num_key_value_heads)
        out[prefix + "self_attn.in_projs.0.weight"] = torch.cat([q, k, d["v"]], dim=0)  # moshi's fused in_proj

    d, h = spec.hidden_size, spec.vector_quantization_hidden_dimension
    for rvq in _RVQ_NAMES.values():
        for proj in ("input_proj", "output_proj"):
            key = f"quantizer.{rvq}.{proj}.weight"
            if key not in out and d == h:
                # transformers skips the projections when the widths match; moshi always has them
                # (force_projection=True), so they are the identity.
                out[key] = torch.eye(d)[:, :, None]
        # `_initialized` only steers k-means init during training; a checkpoint that lacks it is still whole.
        n = spec.num_semantic_quantizers if rvq == "rvq_first" else spec.num_quantizers - spec.num_semantic_quantizers
        for i in range(n):
            out.setdefault(f"quantizer.{rvq}.vq.layers.{i}._codebook._initialized", torch.ones(1))
    if unknown:
        raise SesemeError(f"Mimi weights: cannot place {len(unknown)} tensor(s): {', '.join(unknown[:5])}")
    return out


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    expected = set(model.state_dict())
    # moshi's attention also accepts its older fused names (in_proj_weight, out_proj.weight) via a load hook.
    legacy = {k.replace("self_attn.in_proj_weight", "self_attn.in_projs.0.weight")
              .replace("self_attn.in_proj.weight", "self_attn.in_projs.0.weight")
              .replace("self_attn.out_proj.weight", "self_attn.out_projs.0.weight") for k in state}
    missing, extra = sorted(expected - legacy), sorted(legacy - expected)
    if missing or extra:
        raise SesemeError(f"{source}: Mimi weights do not match the model: "
                          f"missing {len(missing)} {missing[:3]}, unexpected {len(extra)} {extra[:3]}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # shape mismatches
        raise SesemeError(f"{source}: Mimi weights do not match the model: {str(e).splitlines()[-1].strip()}") \
            from None


# ---------------------------------------------------------------- the codec


class MimiCodec:
    """moshi's Mimi behind a small API. `model` is the moshi MimiModel (eval, on `device`)."""

    def __init__(self, model, num_codebooks: int):
        if not model.quantizer.n_q_semantic <= num_codebooks <= model.total_codebooks:
            raise ValueError(f"num_codebooks must be in [{model.quantizer.n_q_semantic}, {model.total_codebooks}], "
                             f"not {num_codebooks}")
        model.set_num_codebooks(num_codebooks)  # encode emits, decode expects this many codebooks
        self.model = model
        self.sample_rate: int = model.sample_rate
        self.frame_rate: float = model.frame_rate
        self.frame_size: int = model.frame_size  # samples per frame: 1920
        self.num_codebooks: int = num_codebooks
        self.cardinality: int = model.cardinality

    @classmethod
    def from_transformers(cls, codec_config: dict, state: dict[str, torch.Tensor], device="cpu",
                          num_codebooks: int | None = None) -> "MimiCodec":
        """`codec_config`: the `codec_config` dict of a transformers CsmConfig; `state`: the tensors under
        `codec_model.` with that prefix stripped."""
        spec = MimiSpec.from_transformers(codec_config)
        model = spec.build()
        _load_strict(model, transformers_to_moshi_state(state, codec_config), "transformers Mimi")
        return cls(model.to(device), num_codebooks or spec.num_quantizers)

    @classmethod
    def from_moshi_file(cls, path, num_codebooks: int = 32, device="cpu",
                        codec_config: dict | None = None) -> "MimiCodec":
        """moshi's own Mimi safetensors (for CSM: kyutai's tokenizer-e351c8d8-checkpoint125.safetensors).

        `codec_config` describes the shapes in transformers' terms; None means kyutai's Mimi."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))  # safetensors only: a checkpoint must never run code
        except (OSError, SafetensorError) as e:  # missing, unreadable, not a safetensors file
            raise InputError(f"cannot read Mimi weights {path}: {e}") from None
        model = MimiSpec.from_transformers(codec_config or {}).build()  # {}: transformers' defaults = kyutai's
        _load_strict(model, state, str(path))
        return cls(model.to(device), num_codebooks)

    @classmethod
    def random(cls, size: str = "tiny", seed: int = 0, num_codebooks: int = 32, device="cpu") -> "MimiCodec":
        """Seeded random weights. "full": real Mimi shapes (benchmarks); "tiny": small widths, 1 transformer
        layer (fast CPU tests). Both keep 24 kHz, 1920-sample frames and 32 x 2048 codebooks."""
        if size not in ("tiny", "full"):
            raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")
        spec = MimiSpec.from_transformers(_TINY if size == "tiny" else {})
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone
            torch.manual_seed(seed)
            model = spec.build()  # nn default init, on CPU so weights do not depend on the device
            # Codebooks start all-zero; random centroids make every code decode to something distinct.
            # Later RVQ levels get smaller centroids, as residuals shrink in a trained Mimi.
            codebooks = [m for m in model.modules() if hasattr(m, "embedding_sum")]  # in RVQ order
            for level, cb in enumerate(codebooks):
                cb.embedding_sum.copy_(torch.randn_like(cb.embedding_sum) * 0.9**level)
                cb.cluster_usage.fill_(1.0)
                cb._initialized.fill_(1.0)
        return cls(model.to(device), num_codebooks)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """audio (samples,) float at `sample_rate` -> codes (num_codebooks, frames), int64.

        frames = ceil(samples / frame_size): the tail is zero-padded to a whole frame."""
        if audio.dim() != 1:
            raise ValueError(f"encode expects 1-D audio, got shape {tuple(audio.shape)}")
        if audio.numel() == 0:
            return torch.empty(self.num_codebooks, 0, dtype=torch.long, device=self.device)
        dtype = next(self.model.parameters()).dtype
        x = audio.to(device=self.device, dtype=dtype)[None, None]
        with _no_torch_compile():
            return self.model.encode(x)[0]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (K, frames) -> audio (frames * frame_size,) float32; or (B, K, frames) -> (B, samples).

        Codes must lie in [0, cardinality): not checked here (a device sync), out-of-range codes crash on CUDA."""
        if codes.dim() not in (2, 3) or codes.shape[-2] != self.num_codebooks:
            raise ValueError(f"decode expects ({self.num_codebooks}, T) or (B, {self.num_codebooks}, T) codes, "
                             f"got shape {tuple(codes.shape)}")
        batched = codes.dim() == 3
        c = codes if batched else codes[None]
        if c.shape[-1] == 0:
            audio = torch.zeros(c.shape[0], 0, device=self.device)
        else:
            with _no_torch_compile():
                audio = self.model.decode(c.to(device=self.device, dtype=torch.long))[:, 0].float()
        return audio if batched else audio[0]


def _no_torch_compile():
    """moshi torch.compiles a few small functions (RoPE, gating) on their first call, and again for every new
    input length: each compile stalls the caller for seconds (measured: ~20 s of a 512-request `seseme
    batch` run on an H100 went to it). Mimi's eager speed is plenty for us, so never compile."""
    from moshi.utils.compile import no_compile

    return no_compile()
