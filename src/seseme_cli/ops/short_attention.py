"""RoPE + KV-cache append + decode attention in one kernel, for short caches: the depth decoder's one-token steps.

    rope_append_attention(qkv, positions, cache_rows, lengths, inv_freq, k_cache, v_cache, out)

is `rope_append` followed by `decode_attention` (ops.attention, whose arguments and checks it shares) without q
as an output, in one launch of cuda/rope_append_attention.cu where the kernel applies, else its `_ref` twin.
"""

from __future__ import annotations

import torch

from seseme_cli.ops.kernels import dtype_code, has_cuda_kernels, kernels_module
from seseme_cli.ops.attention import (ATTENTION_DTYPES, MAX_ROWS, call_kernel, check_attention_args, check_rope_args,
                                      check_threads, decode_attention_ref, rope_append_ref)

Tensor = torch.Tensor

SHORT_MAX_LEN = 64  # kShortAttnMaxLen: cache slots the fused kernel holds in shared memory
SHORT_MAX_HEAD_DIM = 128  # kShortAttnMaxHeadDim
SHORT_MAX_REP = 8  # query heads per KV head
SHORT_MAX_THREADS = 256  # kShortAttnMaxThreads


def rope_append_attention(
    qkv: Tensor,
    positions: Tensor,
    cache_rows: Tensor,
    lengths: Tensor,
    inv_freq: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    out: Tensor,
    scale: float | None = None,
    *,
    heads_per_block: int | None = None,
    threads: int | None = None,
) -> Tensor:
    """`rope_append` then `decode_attention` in one kernel (cuda/rope_append_attention.cu), for the depth
    decoder's one-token steps; returns out (N, H, hd), written, with the caches' slots (cache_rows[n],
    positions[n]) written as rope_append writes them.

    Arguments as in those two ops (q is not an output here). Extra preconditions, because the kernel reads them
    before it waits for the kernel launched just before it (cuda/launch.cuh): positions, cache_rows, lengths,
    inv_freq and every cache slot other than the one a row writes must not be written by that kernel (only qkv
    may come from it); and rows must have distinct cache rows. heads_per_block (dividing H // Hkv) and threads
    (a multiple of 32 in [32, 256]) are the launch shape; None = defaults.

    The kernel runs for contiguous, 16-byte aligned bf16/fp16 CUDA tensors with hd % 16 == 0, hd <= 128,
    S <= 64, H // Hkv <= 8 and N <= 65535, outside autograd; anything else goes to `rope_append_attention_ref`.
    Kernel rounding is that of the two kernels (q and k rounded once after an fp32 rotation).
    """
    scale = _check_short_args(qkv, positions, cache_rows, lengths, inv_freq, k_cache, v_cache, out, scale,
                              heads_per_block, threads)
    if not _short_kernel_applies(qkv, positions, cache_rows, lengths, inv_freq, k_cache, v_cache, out):
        return rope_append_attention_ref(qkv, positions, cache_rows, lengths, inv_freq, k_cache, v_cache, out, scale,
                                         heads_per_block=heads_per_block, threads=threads)
    n, H, hd = out.shape
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
        lengths.data_ptr(),
        lengths.dtype == torch.int32,
        inv_freq.data_ptr(),
        n,
        H,
        Hkv,
        hd,
        B,
        S,
        float(scale),
        heads_per_block or 0,
        threads or 0,
        dtype_code(qkv.dtype),
    )
    call_kernel(qkv.device, kernels_module().rope_append_attention, args)
    return out


def rope_append_attention_ref(
    qkv: Tensor,
    positions: Tensor,
    cache_rows: Tensor,
    lengths: Tensor,
    inv_freq: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    out: Tensor,
    scale: float | None = None,
    *,
    heads_per_block: int | None = None,
    threads: int | None = None,
) -> Tensor:
    """`rope_append_attention` in plain PyTorch: `rope_append_ref` into a new q, then `decode_attention_ref`.
    The launch arguments are only checked."""
    scale = _check_short_args(qkv, positions, cache_rows, lengths, inv_freq, k_cache, v_cache, out, scale,
                              heads_per_block, threads)
    q = torch.empty_like(out)
    rope_append_ref(qkv, positions, cache_rows, inv_freq, k_cache, v_cache, q)
    return decode_attention_ref(q, k_cache, v_cache, cache_rows, lengths, out, scale)


def short_attention_fits(heads: int, kv_heads: int, head_dim: int, cache_len: int) -> bool:
    """Whether the fused kernel takes this shape (the engine's switch between it and the two kernels)."""
    return (head_dim % 16 == 0 and head_dim <= SHORT_MAX_HEAD_DIM and cache_len <= SHORT_MAX_LEN
            and heads % kv_heads == 0 and heads // kv_heads <= SHORT_MAX_REP)


def _check_short_args(qkv, positions, cache_rows, lengths, inv_freq, k_cache, v_cache, out, scale, heads_per_block,
                      threads) -> float:
    """Raises ValueError on bad arguments (those of rope_append and decode_attention); returns the scale."""
    check_rope_args(qkv, positions, cache_rows, inv_freq, k_cache, v_cache, out, None)
    scale = check_attention_args(out, k_cache, v_cache, cache_rows, lengths, out, scale, None, None, None, None)
    rep = out.shape[1] // k_cache.shape[2]
    if heads_per_block is not None and (isinstance(heads_per_block, bool) or not isinstance(heads_per_block, int)
                                        or heads_per_block < 1 or rep % heads_per_block):
        raise ValueError(f"rope_append_attention: heads_per_block must be None or divide {rep} "
                         f"(query heads per KV head), got {heads_per_block!r}")
    check_threads("rope_append_attention", threads, SHORT_MAX_THREADS)
    return scale


def _short_kernel_applies(qkv, positions, cache_rows, lengths, inv_freq, k_cache, v_cache, out) -> bool:
    tensors = (qkv, positions, cache_rows, lengths, inv_freq, k_cache, v_cache, out)
    n, H, hd = out.shape
    B, S, Hkv, _ = k_cache.shape
    return (
        qkv.is_cuda
        and qkv.dtype in ATTENTION_DTYPES
        and inv_freq.dtype == torch.float32
        and short_attention_fits(H, Hkv, hd, S)
        and n <= MAX_ROWS
        and all(t.is_contiguous() for t in tensors)
        and all(t.data_ptr() % 16 == 0 for t in (qkv, k_cache, v_cache, out))
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (qkv, k_cache, v_cache)))
        and has_cuda_kernels()
    )
