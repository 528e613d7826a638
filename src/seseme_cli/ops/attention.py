"""RoPE + KV-cache append, and decode attention over the static KV cache: the attention half of a layer.

    rope_append(qkv, positions, cache_rows, inv_freq, k_cache, v_cache, q_out)       # q_out, caches written
    decode_attention(q_out, k_cache, v_cache, cache_rows, lengths, out, workspace=ws)  # out written

Query row n (one token) reads and writes cache row cache_rows[n] at position positions[n] and attends to slots
0 .. lengths[n] - 1 (lengths = positions + 1 for causal decoding). Rows may share a cache row: the depth
decoder's first step runs positions 0 and 1 of one sequence as two rows. Caches are (B, S, kv_heads, head_dim),
query head h reads KV head h // (heads // kv_heads), RoPE rotates halves: exactly `model.Attention`.

`rope_append` / `decode_attention` run the CUDA kernels (cuda/rope.cu, cuda/attention.cu) when they can and
otherwise their `_ref` twins, which are plain PyTorch with the same signature. With the outputs and (for
split-KV) the workspace given, the kernel path allocates nothing and never syncs the host, so the engine can
capture a frame in a CUDA graph. The split count is a launch constant picked from the cache length and N, never
from the lengths (which live on the device); each split finds its key range from lengths[n] on the device.
"""

from __future__ import annotations

import functools
import math

import torch

from seseme_cli.ops.kernels import dtype_code, has_cuda_kernels, kernels_module, stream_handle

Tensor = torch.Tensor

ROPE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ATTENTION_DTYPES = (torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int64, torch.int32)
MAX_HEAD_DIM = 256  # kRopeMaxHeadDim = kAttnMaxHeadDim
ROPE_MAX_THREADS = 1024  # kRopeMaxThreads
ATTENTION_MAX_THREADS = 256  # kAttnMaxThreads
MAX_SPLITS = 64  # kAttnMaxSplits
KEYS_PER_ITER = (1, 2, 4, 8)
MAX_REP_TIMES_KEYS = 32  # kAttnMaxRepTimesKeys
DEFAULT_KEYS_PER_ITER = 4  # kAttnDefaultKeysPerIter
MAX_ROWS = 65535  # grid.z of the attention kernel
MIN_KEYS_PER_SPLIT = 64  # no split is planned for fewer keys than this (at full cache length)
BLOCKS_PER_SM = 2  # split until the grid has this many blocks per SM (at full cache length)


# ---------------------------------------------------------------------------------------------- RoPE + append


def rope_append(
    qkv: Tensor,
    positions: Tensor,
    cache_rows: Tensor,
    inv_freq: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    q_out: Tensor,
    *,
    threads: int | None = None,
) -> Tensor:
    """Rotate q and k of each row with RoPE, append k and v to the caches, write q; returns q_out.

    qkv (N, (H + 2 Hkv) * hd): per row [q | k | v], the fused QKV projection's output; positions (N,) and
    cache_rows (N,) int64 or int32; inv_freq (hd / 2,) fp32 (`model.rope_inv_freq`); k_cache, v_cache
    (B, S, Hkv, hd); q_out (N, H, hd), written. H, Hkv, hd come from q_out and the caches; hd is even.
    With a = positions[n] * inv_freq (fp32) and rotate_half as in the model:
        q_out[n]                          = q * cos(a) + rotate_half(q) * sin(a)
        k_cache[cache_rows[n], positions[n]] = the same rotation of k;  v_cache[...] = v
    Positions must be in [0, S) and cache rows in [0, B); two rows writing one slot leave either value.
    threads: threads per block of the kernel (a multiple of 32 in [32, 1024]; None = default).

    The kernel (contiguous CUDA tensors, bf16/fp16/fp32, inv_freq fp32) computes in fp32 and rounds once;
    `rope_append_ref` rounds like the model (cos/sin and each product in the tensor dtype). A kernel row
    with an out-of-range position or cache row writes no cache slot; the reference raises or wraps.
    """
    check_rope_args(qkv, positions, cache_rows, inv_freq, k_cache, v_cache, q_out, threads)
    if not _rope_kernel_applies(qkv, positions, cache_rows, inv_freq, k_cache, v_cache, q_out):
        return rope_append_ref(qkv, positions, cache_rows, inv_freq, k_cache, v_cache, q_out, threads=threads)
    n = qkv.shape[0]
    if n == 0:
        return q_out
    B, S, Hkv, hd = k_cache.shape
    args = (
        q_out.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        qkv.data_ptr(),
        positions.data_ptr(),
        positions.dtype == torch.int32,
        cache_rows.data_ptr(),
        cache_rows.dtype == torch.int32,
        inv_freq.data_ptr(),
        n,
        q_out.shape[1],
        Hkv,
        hd,
        B,
        S,
        dtype_code(qkv.dtype),
        threads or 0,
    )
    call_kernel(qkv.device, kernels_module().rope_append, args)
    return q_out


def rope_append_ref(
    qkv: Tensor,
    positions: Tensor,
    cache_rows: Tensor,
    inv_freq: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    q_out: Tensor,
    *,
    threads: int | None = None,
) -> Tensor:
    """`rope_append` in plain PyTorch with the model's arithmetic (`Transformer.forward` / `Attention`):
    angles in fp32, cos/sin rounded to the tensor dtype, products and sum in the tensor dtype.
    `threads` is only checked."""
    check_rope_args(qkv, positions, cache_rows, inv_freq, k_cache, v_cache, q_out, threads)
    n, H = qkv.shape[0], q_out.shape[1]
    Hkv, hd = k_cache.shape[2], k_cache.shape[3]
    x = qkv.view(n, H + 2 * Hkv, hd)
    q, k, v = x[:, :H], x[:, H : H + Hkv], x[:, H + Hkv :]
    angles = positions.unsqueeze(-1).float() * inv_freq.float()  # fp32, like the model
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(qkv.dtype).unsqueeze(1), angles.sin().to(qkv.dtype).unsqueeze(1)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    rows, pos = cache_rows.long(), positions.long()
    k_cache[rows, pos] = k
    v_cache[rows, pos] = v
    return q_out.copy_(q)


def _rotate_half(x: Tensor) -> Tensor:  # model.rotate_half (not imported: model imports ops)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def check_rope_args(qkv, positions, cache_rows, inv_freq, k_cache, v_cache, q_out, threads) -> None:
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"rope_append: k_cache and v_cache must be (B, S, Hkv, hd) of one shape, "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    B, S, Hkv, hd = k_cache.shape
    if min(B, S, Hkv) < 1 or hd < 2 or hd % 2 or hd > MAX_HEAD_DIM:
        raise ValueError(f"rope_append: caches must be non-empty with even head_dim <= {MAX_HEAD_DIM}, "
                         f"got {tuple(k_cache.shape)}")
    if q_out.dim() != 3 or q_out.shape[2] != hd or q_out.shape[1] < 1 or q_out.shape[1] % Hkv:
        raise ValueError(f"rope_append: q_out must be (N, H, {hd}) with H a multiple of {Hkv}, "
                         f"got {tuple(q_out.shape)}")
    n, H = q_out.shape[0], q_out.shape[1]
    if qkv.shape != (n, (H + 2 * Hkv) * hd):
        raise ValueError(f"rope_append: qkv must be ({n}, {(H + 2 * Hkv) * hd}) = (N, (H + 2 Hkv) * hd), "
                         f"got {tuple(qkv.shape)}")
    _check_index("rope_append", "positions", positions, n)
    _check_index("rope_append", "cache_rows", cache_rows, n)
    if inv_freq.shape != (hd // 2,) or not inv_freq.is_floating_point():
        raise ValueError(f"rope_append: inv_freq must be ({hd // 2},) floating point, "
                         f"got {tuple(inv_freq.shape)} {inv_freq.dtype}")
    for name, t in (("q_out", q_out), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != qkv.dtype:
            raise ValueError(f"rope_append: {name} is {t.dtype}, qkv {qkv.dtype}")
    _check_devices("rope_append", qkv, positions=positions, cache_rows=cache_rows, inv_freq=inv_freq,
                   k_cache=k_cache, v_cache=v_cache, q_out=q_out)
    check_threads("rope_append", threads, ROPE_MAX_THREADS)


def _rope_kernel_applies(qkv, positions, cache_rows, inv_freq, k_cache, v_cache, q_out) -> bool:
    tensors = (qkv, positions, cache_rows, inv_freq, k_cache, v_cache, q_out)
    return (
        qkv.is_cuda
        and qkv.dtype in ROPE_DTYPES
        and inv_freq.dtype == torch.float32
        and all(t.is_contiguous() for t in tensors)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))  # the kernel has no backward
        and has_cuda_kernels()
    )


# ---------------------------------------------------------------------------------------------- attention


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_rows: Tensor,
    lengths: Tensor,
    out: Tensor,
    scale: float | None = None,
    workspace: Tensor | None = None,
    num_splits: int | None = None,
    *,
    threads: int | None = None,
    keys_per_iter: int | None = None,
) -> Tensor:
    """Attention of one query token per row over its cache row; returns out.

    q (N, H, hd); k_cache, v_cache (B, S, Hkv, hd) with H % Hkv == 0; cache_rows (N,) and lengths (N,) int32
    or int64; out (N, H, hd) in q's dtype, written. Row n attends to slots 0 .. L - 1 of cache row
    cache_rows[n], L = lengths[n] clamped to [0, S] (a row with L = 0 gets zeros); query head h reads KV head
    h // (H // Hkv); softmax(scale * q . k) in fp32, scale = hd ** -0.5 by default. Slots >= L are never read.

    workspace: fp32, from `attention_workspace` (1-D, >= workspace_floats(N, H, hd, num_splits) floats),
    needed for split-KV; without it the kernel path allocates one when it splits.
    num_splits: split-KV blocks per (row, KV head), in [1, MAX_SPLITS]; None picks `default_num_splits`
    (capped by the workspace). threads (a multiple of 32 in [32, 256]) and keys_per_iter (1, 2, 4 or 8 with
    keys_per_iter * heads per block <= 32, see `max_keys_per_iter`) are the kernel's launch shape, for the
    autotuner; None = defaults. The reference path checks and ignores all three.

    The kernel runs for contiguous, 16-byte aligned bf16/fp16 CUDA tensors with hd % 8 == 0, hd <= 256,
    N <= 65535, S <= 2^24 and S * Hkv * hd < 2^31, outside autograd; anything else goes to
    `decode_attention_ref` (same result up to fp32 summation order; the reference raises on an out-of-range
    cache row, which the kernel treats as L = 0).
    """
    scale = check_attention_args(q, k_cache, v_cache, cache_rows, lengths, out, scale, workspace, num_splits,
                                  threads, keys_per_iter)
    if not _attention_kernel_applies(q, k_cache, v_cache, cache_rows, lengths, out, workspace):
        return decode_attention_ref(q, k_cache, v_cache, cache_rows, lengths, out, scale, workspace, num_splits,
                                    threads=threads, keys_per_iter=keys_per_iter)
    n, H, hd = q.shape
    if n == 0:
        return out
    B, S, Hkv, _ = k_cache.shape
    capacity = MAX_SPLITS if workspace is None else workspace.numel() // workspace_floats(n, H, hd, 1)
    if num_splits is None:
        num_splits = max(1, min(default_num_splits(n, H, Hkv, S, q.device), capacity))
    elif num_splits > capacity:
        raise ValueError(f"decode_attention: the workspace holds {capacity} splits for N={n}, "
                         f"num_splits={num_splits} asked")
    if num_splits > 1 and workspace is None:
        workspace = attention_workspace(n, H, hd, num_splits, q.device)
    ws = workspace if num_splits > 1 else None
    args = (
        out.data_ptr(),
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        cache_rows.data_ptr(),
        cache_rows.dtype == torch.int32,
        lengths.data_ptr(),
        lengths.dtype == torch.int32,
        0 if ws is None else ws.data_ptr(),
        0 if ws is None else ws.numel(),
        n,
        H,
        Hkv,
        hd,
        B,
        S,
        float(scale),
        num_splits,
        threads or 0,
        keys_per_iter or 0,
        dtype_code(q.dtype),
    )
    call_kernel(q.device, kernels_module().decode_attention, args)
    return out


def decode_attention_ref(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_rows: Tensor,
    lengths: Tensor,
    out: Tensor,
    scale: float | None = None,
    workspace: Tensor | None = None,
    num_splits: int | None = None,
    *,
    threads: int | None = None,
    keys_per_iter: int | None = None,
) -> Tensor:
    """`decode_attention` in plain PyTorch: gather the rows, explicit fp32 softmax over the valid slots (masked
    slots are zeroed before use, so whatever they hold cannot leak), one rounding to q's dtype. What the
    model's scaled_dot_product_attention computes, with fp32 intermediates. The launch arguments are only
    checked. Memory: two fp32 (N, S, Hkv, hd) gathers; for tests and fallbacks."""
    scale = check_attention_args(q, k_cache, v_cache, cache_rows, lengths, out, scale, workspace, num_splits,
                                  threads, keys_per_iter)
    n, H, hd = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    rows = cache_rows.long()
    valid = torch.arange(S, device=q.device) < lengths.long().clamp(0, S).unsqueeze(-1)  # (N, S)
    keep = valid[:, :, None, None]
    k = torch.where(keep, k_cache.index_select(0, rows).float(), 0.0)  # (N, S, Hkv, hd)
    v = torch.where(keep, v_cache.index_select(0, rows).float(), 0.0)
    qf = q.float().view(n, Hkv, H // Hkv, hd)
    scores = torch.einsum("ngrd,nsgd->ngrs", qf, k) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    p = torch.where(valid.any(-1)[:, None, None, None], p, 0.0)  # L = 0: zeros, not NaN
    o = torch.einsum("ngrs,nsgd->ngrd", p, v).reshape(n, H, hd)
    return out.copy_(o)


def workspace_floats(rows: int, heads: int, head_dim: int, splits: int) -> int:
    """fp32 elements the split-KV path needs: per (split, row, head) a partial output (head_dim) and its
    (max, sum) pair: splits * rows * heads * (head_dim + 2). 4 bytes each."""
    return splits * rows * heads * (head_dim + 2)


def attention_workspace(rows: int, num_heads: int, head_dim: int, max_splits: int, device) -> Tensor:
    """The fp32 workspace for `decode_attention` calls with up to `rows` rows and `max_splits` splits
    (clamped to MAX_SPLITS; the default choice never exceeds `max_num_splits(cache_len)`, so that is the
    value to pass): workspace_floats(rows, num_heads, head_dim, max_splits) * 4 bytes, e.g. 2.2 MB for
    CSM-1B's backbone at 8 rows and 32 splits. A call with fewer rows may use more splits of it."""
    splits = max(1, min(int(max_splits), MAX_SPLITS))
    return torch.empty(workspace_floats(rows, num_heads, head_dim, splits), device=device, dtype=torch.float32)


def max_num_splits(cache_len: int) -> int:
    """The most splits `default_num_splits` picks for a cache of this length (1 up to 2 * MIN_KEYS_PER_SPLIT:
    the depth decoder's 33-slot cache is one pass)."""
    if cache_len <= 2 * MIN_KEYS_PER_SPLIT:
        return 1
    return min(MAX_SPLITS, math.ceil(cache_len / MIN_KEYS_PER_SPLIT))


def default_num_splits(rows: int, heads: int, kv_heads: int, cache_len: int, device) -> int:
    """Splits per (row, KV head) so that a full-length cache keeps BLOCKS_PER_SM blocks per SM busy, each
    block reading at least MIN_KEYS_PER_SPLIT keys. Depends on shapes only (the graph is static); the
    lengths decide on the device how many of the splits get keys."""
    limit = max_num_splits(cache_len)
    if limit == 1 or rows < 1:
        return 1
    rep = heads // kv_heads
    blocks = rows * kv_heads * math.ceil(rep / min(rep, 8))
    return max(1, min(limit, math.ceil(BLOCKS_PER_SM * _sm_count(device) / blocks)))


def max_keys_per_iter(heads: int, kv_heads: int) -> int:
    """The largest keys_per_iter the kernel takes for this head grouping (more would spill registers)."""
    rep = 1
    while rep < min(heads // kv_heads, 8):
        rep *= 2
    return min(KEYS_PER_ITER[-1], MAX_REP_TIMES_KEYS // rep)


@functools.cache
def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def check_attention_args(q, k_cache, v_cache, cache_rows, lengths, out, scale, workspace, num_splits, threads,
                          keys_per_iter) -> float:
    """Raises ValueError on bad arguments; returns the scale to use."""
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or min(k_cache.shape) < 1:
        raise ValueError(
            f"decode_attention: k_cache and v_cache must be non-empty (B, S, Hkv, hd) of one shape, "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    Hkv, hd = k_cache.shape[2], k_cache.shape[3]
    if q.dim() != 3 or q.shape[2] != hd or q.shape[1] < 1 or q.shape[1] % Hkv:
        raise ValueError(f"decode_attention: q must be (N, H, {hd}) with H a multiple of {Hkv}, "
                         f"got {tuple(q.shape)}")
    n = q.shape[0]
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        if t.dtype != q.dtype:
            raise ValueError(f"decode_attention: {name} is {t.dtype}, q {q.dtype}")
    if out.shape != q.shape:
        raise ValueError(f"decode_attention: out must be {tuple(q.shape)}, got {tuple(out.shape)}")
    _check_index("decode_attention", "cache_rows", cache_rows, n)
    _check_index("decode_attention", "lengths", lengths, n)
    if workspace is not None and (workspace.dtype != torch.float32 or workspace.dim() != 1):
        raise ValueError(f"decode_attention: workspace must be 1-D float32 (attention_workspace), "
                         f"got {tuple(workspace.shape)} {workspace.dtype}")
    _check_devices("decode_attention", q, k_cache=k_cache, v_cache=v_cache, cache_rows=cache_rows,
                   lengths=lengths, out=out, workspace=workspace)
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or not 1 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"decode_attention: num_splits must be None or an int in [1, {MAX_SPLITS}], "
                         f"got {num_splits!r}")
    check_threads("decode_attention", threads, ATTENTION_MAX_THREADS)
    most = max_keys_per_iter(q.shape[1], Hkv)
    if keys_per_iter is not None and (isinstance(keys_per_iter, bool) or keys_per_iter not in KEYS_PER_ITER
                                      or keys_per_iter > most):
        raise ValueError(f"decode_attention: keys_per_iter must be None or one of "
                         f"{[k for k in KEYS_PER_ITER if k <= most]} for {q.shape[1]} heads over {Hkv} KV heads, "
                         f"got {keys_per_iter!r}")
    if scale is None:
        return hd**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"decode_attention: scale must be None or a finite number, got {scale!r}")
    return float(scale)


def _attention_kernel_applies(q, k_cache, v_cache, cache_rows, lengths, out, workspace) -> bool:
    tensors = (q, k_cache, v_cache, cache_rows, lengths, out) + (() if workspace is None else (workspace,))
    big = (q, k_cache, v_cache, out) + (() if workspace is None else (workspace,))
    hd = q.shape[2]
    return (
        q.is_cuda
        and q.dtype in ATTENTION_DTYPES
        and hd % 8 == 0
        and hd <= MAX_HEAD_DIM
        and q.shape[0] <= MAX_ROWS
        and k_cache.shape[1] <= 1 << 24
        and k_cache[0].numel() < 1 << 31  # 32-bit offsets within a cache row
        and all(t.is_contiguous() for t in tensors)
        and all(t.data_ptr() % 16 == 0 for t in big)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)))
        and has_cuda_kernels()
    )


# ---------------------------------------------------------------------------------------------- shared


def _check_index(op: str, name: str, t: Tensor, n: int) -> None:
    if t.shape != (n,) or t.dtype not in INDEX_DTYPES:
        raise ValueError(f"{op}: {name} must be ({n},) int64 or int32, got {tuple(t.shape)} {t.dtype}")


def _check_devices(op: str, first: Tensor, **others: Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device}, the first input on {first.device}")


def check_threads(op: str, threads: int | None, max_threads: int) -> None:
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads % 32 or not 32 <= threads <= max_threads:
        raise ValueError(f"{op}: threads must be None or a multiple of 32 in [32, {max_threads}], got {threads!r}")


def call_kernel(device: torch.device, fn, args: tuple) -> None:
    """Launch on `device`'s current stream; arguments already checked."""
    index = device.index
    if index == torch.cuda.current_device():
        fn(*args, stream_handle(index))
    else:
        with torch.cuda.device(index):  # the launch goes to the current device's context
            fn(*args, stream_handle(index))
