"""RoPE + KV-cache append + decode attention fused for short caches: the depth decoder's one-token steps.

    rope_attention(qkv, positions, cache_rows, inv_freq, k_cache, v_cache, out)   # = rope_append + decode_attention

`rope_attention` runs the kernel (cuda/rope_attention.cu) when it can and `rope_attention_ref` (the two reference
ops of ops/attention.py) otherwise.
"""

from __future__ import annotations

import torch

from ..kernels import dtype_code, kernels_module
from .attention import (
    _attention_kernel_applies,
    _call,
    _check_attention_args,
    _check_rope_args,
    _rope_kernel_applies,
    decode_attention_ref,
    rope_append_ref,
)

Tensor = torch.Tensor

ROPE_ATTENTION_HEAD_DIM = 128  # kRopeAttnHeadDim
ROPE_ATTENTION_MAX_CACHE_LEN = 64  # kRopeAttnMaxCacheLen
ROPE_ATTENTION_MAX_REP = 8  # kRopeAttnMaxRep


def rope_attention(
    qkv: Tensor,
    positions: Tensor,
    cache_rows: Tensor,
    inv_freq: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    out: Tensor,
    scale: float | None = None,
) -> Tensor:
    """`rope_append` then `decode_attention` with lengths = positions + 1, in one kernel (cuda/rope_attention.cu)
    for the depth decoder's one-token steps; returns out (N, H, hd).

    Same arguments as the two ops (out takes q_out's shape). Each row must use its own cache row: the kernel
    does not see another row's new key, where the two-op path (and the reference) would. The kernel runs where
    both unfused kernels would (contiguous, 16-byte aligned bf16/fp16 CUDA tensors, N <= 65535, outside
    autograd) with hd = 128, S <= 64 and H = Hkv * rep, rep <= 8; anything else runs `rope_attention_ref`."""
    scale = _check_rope_attention_args(qkv, positions, cache_rows, inv_freq, k_cache, v_cache, out, scale)
    if not _rope_attention_kernel_applies(qkv, positions, cache_rows, inv_freq, k_cache, v_cache, out):
        return rope_attention_ref(qkv, positions, cache_rows, inv_freq, k_cache, v_cache, out, scale)
    n = qkv.shape[0]
    if n == 0:
        return out
    B, S, Hkv, _ = k_cache.shape
    args = (
        out.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        qkv.data_ptr(),
        positions.data_ptr(),
        positions.dtype == torch.int32,
        cache_rows.data_ptr(),
        cache_rows.dtype == torch.int32,
        inv_freq.data_ptr(),
        n,
        out.shape[1],
        Hkv,
        B,
        S,
        float(scale),
        dtype_code(qkv.dtype),
    )
    _call(qkv.device, kernels_module().rope_attention, args)
    return out


def rope_attention_ref(
    qkv: Tensor,
    positions: Tensor,
    cache_rows: Tensor,
    inv_freq: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    out: Tensor,
    scale: float | None = None,
) -> Tensor:
    """`rope_attention` as the two reference ops it fuses (allocates the rotated q)."""
    scale = _check_rope_attention_args(qkv, positions, cache_rows, inv_freq, k_cache, v_cache, out, scale)
    q = torch.empty_like(out)
    rope_append_ref(qkv, positions, cache_rows, inv_freq, k_cache, v_cache, q)
    return decode_attention_ref(q, k_cache, v_cache, cache_rows, positions + 1, out, scale)


def _check_rope_attention_args(qkv, positions, cache_rows, inv_freq, k_cache, v_cache, out, scale) -> float:
    _check_rope_args(qkv, positions, cache_rows, inv_freq, k_cache, v_cache, out, None)
    return _check_attention_args(out, k_cache, v_cache, cache_rows, positions, out, scale, None, None, None, None)


def _rope_attention_kernel_applies(qkv, positions, cache_rows, inv_freq, k_cache, v_cache, out) -> bool:
    """Where both fused kernels would run (ops/attention.py), for the one shape family compiled."""
    H, (S, Hkv, hd) = out.shape[1], k_cache.shape[1:]
    return (
        hd == ROPE_ATTENTION_HEAD_DIM
        and S <= ROPE_ATTENTION_MAX_CACHE_LEN
        and H // Hkv <= ROPE_ATTENTION_MAX_REP
        and _rope_kernel_applies(qkv, positions, cache_rows, inv_freq, k_cache, v_cache, out)
        and _attention_kernel_applies(out, k_cache, v_cache, cache_rows, positions, out, None)
    )
