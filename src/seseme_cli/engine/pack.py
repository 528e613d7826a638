"""Weights in the layouts the decode kernels read, shared with the reference model (never held twice).

q/k/v become one (q+2kv, dim) matrix and gate/up one (2*ffn, dim) matrix so each is one GEMV; the depth
decoder's 31 heads are stored (31, vocab, dim) so every head is an ordinary row-major linear, in storage whose
vocab is padded with zero rows to a multiple of 8 (EngineWeights.audio_heads_padded, for large batches). The
reference model's parameters are re-pointed at views of these tensors, so its prefill and the engine see the same
memory.

fp8 weights (`pack(model, "fp8")`): every projection (attention, MLP, codebook-0 head, projection, depth heads) is
quantized to e4m3 with an fp32 scale per output channel (ops.linear_fp8.quantize_fp8), and the model's bf16
weights are overwritten with the dequantized values. The engine then runs the fp8 GEMV on the e4m3 copy for calls
of few rows (engine.frame.FP8_MAX_N) and the bf16 kernels on the dequantized copy otherwise (prefill, large
batches): one model, the quantized one, whichever kernel runs, and the reference model computes it too. The cost
is memory: the e4m3 copy is held besides the bf16 one (+1 byte per projection weight, ~1.15 GB for CSM-1B). The
quantization is done once per model and kept on it (`model.fp8_weights`), so later packs reuse it; a model
quantized so cannot be packed as bf16 again (load it again).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from seseme_cli.model.reference import CsmModel, Transformer
from seseme_cli.ops.linear_fp8 import dequantize_fp8, quantize_fp8

WEIGHT_FORMATS = ("bf16", "fp8")  # bf16: the weights as loaded, in the model's dtype


@dataclass(frozen=True)
class Fp8Weight:
    """A weight (..., m, k) as e4m3 values w8 and an fp32 scale per row: W ~= w8.float() * scale[..., None]."""

    w8: torch.Tensor  # (..., m, k) float8_e4m3fn
    scale: torch.Tensor  # (..., m) float32

    def __getitem__(self, i) -> "Fp8Weight":
        return Fp8Weight(self.w8[i], self.scale[i])

    @property
    def nbytes(self) -> int:
        return self.w8.numel() * self.w8.element_size() + self.scale.numel() * self.scale.element_size()


@dataclass
class LayerFp8:
    """A layer's projections in fp8 (the same matrices as LayerWeights', quantized)."""

    wqkv: Fp8Weight
    wo: Fp8Weight
    w_gate_up: Fp8Weight
    w_down: Fp8Weight


@dataclass
class HeadsFp8:
    c0_head: Fp8Weight  # (vocab, dim)
    projection: Fp8Weight  # (depth dim, dim)
    audio_heads: Fp8Weight  # (K-1, vocab, depth dim), scales (K-1, vocab)


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # (dim,)
    wqkv: torch.Tensor  # (q + 2 kv, dim)
    wo: torch.Tensor  # (dim, q)
    mlp_norm: torch.Tensor
    w_gate_up: torch.Tensor  # (2 ffn, dim)
    w_down: torch.Tensor  # (dim, ffn)
    k_cache: torch.Tensor  # (max_batch, max_seq_len, kv_heads, head_dim), the reference model's cache
    v_cache: torch.Tensor
    fp8: LayerFp8 | None = None  # weights="fp8": the projections in e4m3


@dataclass
class StackWeights:
    layers: list[LayerWeights]
    norm: torch.Tensor
    inv_freq: torch.Tensor  # (head_dim / 2,) fp32
    eps: float


@dataclass
class EngineWeights:
    backbone: StackWeights
    depth: StackWeights
    c0_head: torch.Tensor  # (vocab, dim)
    projection: torch.Tensor  # (depth dim, dim)
    audio_heads: torch.Tensor  # (K-1, vocab, depth dim), a view of audio_heads_padded
    audio_embed: torch.Tensor  # (K * vocab, dim)
    depth_audio_embed: torch.Tensor  # (K * vocab, dim)
    projected_embed: torch.Tensor  # (K * vocab, depth dim) = projection(depth_audio_embed), one row per code
    # The heads' storage with the vocab padded by zero rows to a multiple of 8 (padded_vocab): above the MMA
    # kernel's rows each head is one cuBLAS GEMM into logits rows of that width, which keeps every row 16-byte
    # aligned (2051-wide rows kept cuBLAS on an old sm75 kernel, 39 us a head at 512 rows on an H100, run 18b).
    c0_head_padded: torch.Tensor | None = None  # (padded vocab, dim)
    audio_heads_padded: torch.Tensor | None = None  # (K-1, padded vocab, depth dim)
    fp8: HeadsFp8 | None = None  # weights="fp8": the heads and the projection in e4m3
    format: str = "bf16"  # one of WEIGHT_FORMATS


def padded_vocab(vocab: int) -> int:
    """vocab rounded up to a multiple of 8 (16 bytes of bf16)."""
    return -(-vocab // 8) * 8


def _padded_rows(weight: torch.Tensor) -> torch.Tensor:
    """weight (..., vocab, dim) copied into zeroed storage of padded_vocab rows (its first vocab rows)."""
    *lead, vocab, dim = weight.shape
    storage = weight.new_zeros(*lead, padded_vocab(vocab), dim)
    storage[..., :vocab, :] = weight
    return storage


def _padded_heads(model: CsmModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The heads' padded storage (c0 (padded vocab, dim), depth heads (K-1, padded vocab, depth dim)), made once
    per model: its head parameters become views of the first vocab rows, so a later pack finds them in place."""
    stored = getattr(model, "padded_heads", None)
    in_place = stored is not None and (stored[0].data_ptr(), stored[1].data_ptr()) == (
        model.c0_head.weight.data_ptr(), model.audio_head.data_ptr())
    if not in_place:  # first pack, or the parameters were replaced since
        vocab = model.c0_head.weight.shape[0]
        heads = _padded_rows(model.audio_head.detach().transpose(1, 2))
        c0 = _padded_rows(model.c0_head.weight.detach())
        model.audio_head = nn.Parameter(heads[:, :vocab].transpose(1, 2), requires_grad=False)
        model.c0_head.weight = nn.Parameter(c0[:vocab], requires_grad=False)
        model.padded_heads = (c0, heads)
    return model.padded_heads


def _fuse(linears: list[nn.Linear]) -> torch.Tensor:
    """Concatenate the weights of `linears` by rows and make each linear's weight a view of the result."""
    fused = torch.cat([lin.weight.detach() for lin in linears])
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = nn.Parameter(fused[start : start + rows], requires_grad=False)
        start += rows
    return fused


def _pack_stack(stack: Transformer) -> StackWeights:
    layers = []
    for block in stack.layers:
        attn, mlp = block.attn, block.mlp
        if attn.k_cache is None:
            raise RuntimeError("setup_caches must run before the engine packs the weights")
        layers.append(LayerWeights(
            attn_norm=block.attn_norm.weight.detach(),
            wqkv=_fuse([attn.q_proj, attn.k_proj, attn.v_proj]),
            wo=attn.o_proj.weight.detach(),
            mlp_norm=block.mlp_norm.weight.detach(),
            w_gate_up=_fuse([mlp.gate, mlp.up]),
            w_down=mlp.down.weight.detach(),
            k_cache=attn.k_cache,
            v_cache=attn.v_cache,
        ))
    return StackWeights(layers, stack.norm.weight.detach(), stack.inv_freq.float(), stack.cfg.norm_eps)


def project_table(table: torch.Tensor, projection: torch.Tensor, rows_per_chunk: int = 8192) -> torch.Tensor:
    """projection(table) row by row, rounded once like the projection of one embedded code: the depth decoder's
    input for a code becomes one row read instead of an embedding read plus a GEMV over the projection."""
    out = torch.empty(table.shape[0], projection.shape[0], device=table.device, dtype=table.dtype)
    for start in range(0, table.shape[0], rows_per_chunk):
        torch.nn.functional.linear(table[start : start + rows_per_chunk], projection, out=out[start : start + rows_per_chunk])
    return out


def weight_format(model: CsmModel) -> str:
    """"fp8" once a pack with weights="fp8" has quantized the model's weights, else "bf16"."""
    return "fp8" if getattr(model, "fp8_weights", None) is not None else "bf16"


def _quantize_in_place(weight: torch.Tensor) -> Fp8Weight:
    """weight (..., m, k) quantized per row; weight itself is overwritten with the dequantized values, in its dtype
    (the model's parameters are views of it)."""
    w8, scale = quantize_fp8(weight)
    weight.copy_(dequantize_fp8(w8, scale, weight.dtype))
    return Fp8Weight(w8, scale)


def _quantize(weights: EngineWeights) -> dict[str, Fp8Weight]:
    """Every projection of the packed weights, quantized in place; keyed as _attach_fp8 reads them."""
    out = {}
    for name, stack in (("backbone", weights.backbone), ("depth", weights.depth)):
        for i, layer in enumerate(stack.layers):
            for attr in ("wqkv", "wo", "w_gate_up", "w_down"):
                out[f"{name}.{i}.{attr}"] = _quantize_in_place(getattr(layer, attr))
    for attr in ("c0_head", "projection", "audio_heads"):
        out[attr] = _quantize_in_place(getattr(weights, attr))
    return out


def _attach_fp8(weights: EngineWeights, stored: dict[str, Fp8Weight]) -> None:
    for name, stack in (("backbone", weights.backbone), ("depth", weights.depth)):
        for i, layer in enumerate(stack.layers):
            layer.fp8 = LayerFp8(*(stored[f"{name}.{i}.{attr}"] for attr in ("wqkv", "wo", "w_gate_up", "w_down")))
            if layer.fp8.wqkv.w8.shape != layer.wqkv.shape:
                raise RuntimeError("the model's stored fp8 weights do not fit its shapes")
    weights.fp8 = HeadsFp8(stored["c0_head"], stored["projection"], stored["audio_heads"])
    weights.format = "fp8"


def pack(model: CsmModel, weights: str = "bf16") -> EngineWeights:
    """Fuse the model's weights in place (its parameters become views) and return the engine's view of them.
    weights="fp8": also the e4m3 copies of the projections (quantizing the model the first time; see the module
    doc). ValueError for an unknown format, or for "bf16" on a model an earlier pack quantized."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    if weights == "bf16" and weight_format(model) == "fp8":
        raise ValueError("this model's weights were quantized to fp8 by an earlier engine (weights='fp8'); "
                         "load the model again to run it in bf16")
    with torch.no_grad():
        c0, heads = _padded_heads(model)
        vocab = model.c0_head.weight.shape[0]
        packed = EngineWeights(
            backbone=_pack_stack(model.backbone),
            depth=_pack_stack(model.depth),
            c0_head=model.c0_head.weight.detach(),
            projection=model.projection.weight.detach(),
            audio_heads=heads[:, :vocab],
            audio_embed=model.audio_embed.weight.detach(),
            depth_audio_embed=model.depth_audio_embed.weight.detach(),
            projected_embed=None,
            c0_head_padded=c0,
            audio_heads_padded=heads,
        )
        if weights == "fp8":
            if weight_format(model) != "fp8":
                model.fp8_weights = _quantize(packed)
            _attach_fp8(packed, model.fp8_weights)
        # After any quantization: the table is the (dequantized) projection of the embeddings, as the model has it.
        packed.projected_embed = project_table(packed.depth_audio_embed, packed.projection)
        return packed
