"""Attention of a few queries under a boolean mask, in fp32: what Mimi's streaming decoder computes in each of its
8 layers per frame (2 new steps over a 250-slot ring KV cache, moshi's `F.scaled_dot_product_attention(q, k, v,
mask)`), at the engine's 576 decoder slots ~40% of a Mimi frame with PyTorch's kernel.

    out = masked_attention(q, k, v, mask)       # q (B, H, T, D), k / v (B, H, C, D), mask -> (B, H, T, C)

runs cuda/masked_attention.cu where it applies, else `masked_attention_ref`, plain PyTorch with the same signature.
audio.mimi_attention routes Mimi's calls here while the decoder's CUDA graphs are captured.
"""

from __future__ import annotations

import torch

from seseme_cli.ops.attention import call_kernel
from seseme_cli.ops.kernels import has_cuda_kernels, kernels_module

Tensor = torch.Tensor

MAX_QUERIES = 4  # kMaskedAttnMaxQueries
MAX_KEYS = 1024  # kMaskedAttnMaxKeys
HEAD_DIMS = (32, 64, 128)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None = None, *,
                     out: Tensor | None = None) -> Tensor:
    """softmax(scale * q k^T where mask, else -inf) v; returns out (B, H, T, D) in q's dtype.

    q (B, H, T, D); k, v (B, H, C, D); mask bool, broadcastable to (B, H, T, C), True where a query attends a key;
    scale defaults to D ** -0.5 (as in `F.scaled_dot_product_attention`). A query that attends no key gets zeros
    (PyTorch's attention gives NaN there), and a key that no query attends is not read, so what it holds (an
    unfilled ring slot, even NaN) never reaches the result. out: optional result tensor (B, H, T, D), written.

    The kernel runs for fp32 CUDA tensors (mask on the same device) with D in (32, 64, 128), T <= 4, 1 <= C <=
    1024, the last dimension contiguous and 16-byte aligned rows (strides multiples of 4), outside autograd; it
    sums in fp32 in another order than PyTorch. Anything else goes to `masked_attention_ref`.
    """
    B, H, T, C, D = check_masked_attention_args(q, k, v, mask, out)
    scale = D ** -0.5 if scale is None else float(scale)
    if out is None:
        # (B, T, H, D) memory seen as (B, H, T, D): moshi's next step, "b h t d -> b t (h d)", is then a view.
        out = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    if not masked_attention_applies(q, k, v, mask, out):
        return masked_attention_ref(q, k, v, mask, scale, out=out)
    full = mask.expand(B, H, T, C)
    call_kernel(q.device, kernels_module().masked_attention,
                (out.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), full.data_ptr(), B, H, T, C, D,
                 out.stride()[:3], q.stride()[:3], k.stride()[:3], v.stride()[:3], full.stride(), scale))
    return out


def masked_attention_ref(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None = None, *,
                         out: Tensor | None = None) -> Tensor:
    """`masked_attention` in plain PyTorch: same signature and semantics."""
    B, H, T, C, D = check_masked_attention_args(q, k, v, mask, out)
    scale = D ** -0.5 if scale is None else float(scale)
    unread = ~mask.expand(B, H, T, C).any(dim=2).unsqueeze(-1)  # (B, H, C, 1): keys no query attends
    k, v = k.masked_fill(unread, 0), v.masked_fill(unread, 0)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    # A query that attends no key gets zeros (softmax would give NaN there); a NaN an attended key brings stays,
    # as in the kernel (nan_to_num would have turned that query's NaN into zeros too).
    attends = mask.expand(B, H, T, C).any(dim=-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).masked_fill(~attends, 0.0)
    y = torch.matmul(weights, v.float()).to(q.dtype)
    return y if out is None else out.copy_(y)


def check_masked_attention_args(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, out: Tensor | None):
    """(B, H, T, C, D), or ValueError naming what does not fit."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"masked_attention: q, k, v must be 4-D, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, T, D = q.shape
    C = k.shape[2]
    if k.shape != (B, H, C, D) or v.shape != k.shape:
        raise ValueError(f"masked_attention: k and v must be (B, H, C, D) = ({B}, {H}, C, {D}), got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"masked_attention: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if mask.dtype != torch.bool:
        raise ValueError(f"masked_attention: mask must be bool, got {mask.dtype}")
    try:
        broadcasts = torch.broadcast_shapes(mask.shape, (B, H, T, C)) == (B, H, T, C)
    except RuntimeError:
        broadcasts = False
    if not broadcasts:
        raise ValueError(f"masked_attention: mask {tuple(mask.shape)} does not broadcast to {(B, H, T, C)}")
    if out is not None and (out.shape != (B, H, T, D) or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"masked_attention: out must be ({B}, {H}, {T}, {D}) {q.dtype} on {q.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    return B, H, T, C, D


def masked_attention_applies(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, out: Tensor | None = None) -> bool:
    """Whether the kernel takes these (checked) arguments; out None: the op's own output (always fits)."""
    B, H, T, D = q.shape
    C = k.shape[2]
    tensors = (q, k, v) if out is None else (q, k, v, out)
    return (has_cuda_kernels() and q.is_cuda and all(t.device == q.device for t in (*tensors, mask))
            and q.dtype == torch.float32 and D in HEAD_DIMS and 1 <= T <= MAX_QUERIES and 1 <= C <= MAX_KEYS
            and B * H >= 1 and all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0
                                   and all(s % 4 == 0 for s in t.stride()[:3]) for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))))
