"""Weights in the layouts the decode kernels read, shared with the reference model (never held twice).

q/k/v become one (q+2kv, dim) matrix and gate/up one (2*ffn, dim) matrix so each is one GEMV; the depth
decoder's 31 heads are stored (31, vocab, dim) so every head is an ordinary row-major linear. The reference
model's parameters are re-pointed at views of these tensors, so its prefill and the engine see the same memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from seseme_cli.model.reference import CsmModel, Transformer


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
    audio_heads: torch.Tensor  # (K-1, vocab, depth dim)
    audio_embed: torch.Tensor  # (K * vocab, dim)
    depth_audio_embed: torch.Tensor  # (K * vocab, dim)
    projected_embed: torch.Tensor  # (K * vocab, depth dim) = projection(depth_audio_embed), one row per code


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


def pack(model: CsmModel) -> EngineWeights:
    """Fuse the model's weights in place (its parameters become views) and return the engine's view of them."""
    with torch.no_grad():
        heads = model.audio_head.detach().transpose(1, 2).contiguous()
        model.audio_head = nn.Parameter(heads.transpose(1, 2), requires_grad=False)
        return EngineWeights(
            backbone=_pack_stack(model.backbone),
            depth=_pack_stack(model.depth),
            c0_head=model.c0_head.weight.detach(),
            projection=model.projection.weight.detach(),
            audio_heads=heads,
            audio_embed=model.audio_embed.weight.detach(),
            depth_audio_embed=model.depth_audio_embed.weight.detach(),
            projected_embed=project_table(model.depth_audio_embed.weight.detach(), model.projection.weight.detach()),
        )
