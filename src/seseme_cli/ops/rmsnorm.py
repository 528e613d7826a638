"""RMSNorm with an optional fused residual add: the norm in front of every attention and MLP block.

`rms_norm` runs the CUDA kernel (cuda/rmsnorm.cu) when it can, `rms_norm_ref` is the same thing in plain
PyTorch and is what transformers' LlamaRMSNorm computes. Pre-norm blocks use the residual form:

    out, residual = rms_norm(x, weight, eps, residual)   # residual <- x + residual; out = norm(residual)
"""

from __future__ import annotations

import torch

from seseme_cli.ops.kernels import dtype_code, has_cuda_kernels, kernels_module, stream_handle

KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

Tensor = torch.Tensor


def rms_norm(
    x: Tensor,
    weight: Tensor,
    eps: float,
    residual: Tensor | None = None,
    *,
    out: Tensor | None = None,
    residual_out: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Normalise the last dimension of x (+ residual) and scale by weight.

    x: (..., dim); weight: (dim,); residual: like x (same shape, dtype, device) or None.
    Returns out (..., dim), or (out, new_residual) when residual is given, new_residual = x + residual
    rounded to x.dtype. Exactly: s = x (+ residual) in x.dtype;
    out = weight * (s.float() * rsqrt(mean(s.float()^2, -1) + eps)).to(x.dtype).

    out / residual_out: optional preallocated results (x's shape and device; out in x's dtype promoted with
    weight's, residual_out in x's dtype), written and returned; with both given the op allocates nothing,
    which lets the engine capture a frame in a CUDA graph. residual_out may be residual itself (in place).

    The CUDA kernel runs for contiguous CUDA tensors in bf16/fp16/fp32 with weight in x's dtype, outside
    autograd; anything else goes to `rms_norm_ref`, which gives the same result (up to summation order).
    """
    _check_args(x, weight, residual, out, residual_out)
    if not _kernel_applies(x, weight, residual, out, residual_out):
        return rms_norm_ref(x, weight, eps, residual, out=out, residual_out=residual_out)
    if out is None:
        out = torch.empty_like(x)
    if residual is None:
        _launch(x, weight, eps, None, out, None)
        return out
    if residual_out is None:
        residual_out = torch.empty_like(x)
    _launch(x, weight, eps, residual, out, residual_out)
    return out, residual_out


def rms_norm_ref(
    x: Tensor,
    weight: Tensor,
    eps: float,
    residual: Tensor | None = None,
    *,
    out: Tensor | None = None,
    residual_out: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """`rms_norm` in plain PyTorch; same signature and semantics (transformers' LlamaRMSNorm)."""
    s = x if residual is None else x + residual
    h = s.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * h.to(s.dtype)
    if out is not None:
        y = out.copy_(y)
    if residual is None:
        return y
    return y, (s if residual_out is None else residual_out.copy_(s))


def _check_args(x: Tensor, weight: Tensor, residual: Tensor | None, out: Tensor | None,
                residual_out: Tensor | None) -> None:
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"rms_norm: x must be (..., dim) with dim > 0, got shape {tuple(x.shape)}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight must have shape ({x.shape[-1]},), got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: weight is on {weight.device}, x on {x.device}")
    if residual_out is not None and residual is None:
        raise ValueError("rms_norm: residual_out given without residual")
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    for name, t, dtype in (("residual", residual, x.dtype), ("residual_out", residual_out, x.dtype),
                           ("out", out, out_dtype)):
        if t is not None and (t.shape != x.shape or t.dtype != dtype or t.device != x.device):
            raise ValueError(
                f"rms_norm: {name} must be {tuple(x.shape)} {dtype} on {x.device}, "
                f"got {tuple(t.shape)} {t.dtype} on {t.device}"
            )


def _kernel_applies(x: Tensor, weight: Tensor, residual: Tensor | None, out: Tensor | None,
                    residual_out: Tensor | None) -> bool:
    inputs = [t for t in (x, weight, residual) if t is not None]
    return (
        x.is_cuda
        and x.dtype in KERNEL_DTYPES
        and weight.dtype == x.dtype
        and all(t.is_contiguous() for t in (*inputs, out, residual_out) if t is not None)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs))  # the kernel has no backward
        and has_cuda_kernels()
    )


def _launch(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None, out: Tensor,
            residual_out: Tensor | None) -> None:
    """The launch itself, arguments already checked. Its Python overhead is paid ~300 times per frame."""
    if x.numel() == 0:
        return  # empty tensors may have null data pointers; there is nothing to do
    dim = x.shape[-1]
    index = x.device.index
    args = (
        out.data_ptr(),
        x.data_ptr(),
        0 if residual is None else residual.data_ptr(),
        0 if residual_out is None else residual_out.data_ptr(),
        weight.data_ptr(),
        x.numel() // dim,
        dim,
        float(eps),
        dtype_code(x.dtype),
        stream_handle(index),
    )
    if index == torch.cuda.current_device():
        kernels_module().rms_norm(*args)
    else:
        with torch.cuda.device(index):  # the launch goes to the current device's context
            kernels_module().rms_norm(*args)
