"""Decode linear layers: y = x @ W^T (+ residual) and the SwiGLU gate/up pair, ~95% of the bytes of a frame.

`linear` / `swiglu_linear` run the CUDA kernels (cuda/linear*.cu) when they can; `linear_ref` /
`swiglu_linear_ref` beside them are what the reference model computes, in plain PyTorch:

    h = linear(x, w_qkv, out=qkv)                      # qkv = x @ w_qkv.T
    linear(attn, w_o, out=x, residual=x)               # x = x + attn @ w_o.T, in place
    swiglu_linear(h, w_gate_up, out=act)               # act = silu(h @ w_gate.T) * (h @ w_up.T)

Kernels, for n = rows of x up to 64: a CUDA-core GEMV (n <= 8, memory-bound), a tensor-core skinny GEMM
(n <= 64), or cuBLAS into `out` (torch.mm / addmm). `config` (a LinearConfig, a dict of its fields, or None
for `default_config`, which picks per shape from a sweep on an H100) chooses the kernel and its launch
parameters; the autotuner supplies its own. Larger n (prefill) and anything the kernels do not take (CPU,
k % 8 != 0, x or weight not 16-byte aligned, fp32, autograd) go to the reference.

Split-K and the workspace: the MMA kernel splits K over blocks when the row tiles alone cannot fill the GPU.
Its blocks reduce through a caller-given workspace, zero-initialised once (`linear_config.linear_workspace`); each call
leaves it zeroed again, so one buffer serves every call on one stream, of any shape, as long as it is at least
`linear_workspace_bytes` for each. Without a workspace the default config does not split K. With `out` (and the
workspace when the config splits) given, a call allocates nothing and never syncs: it can be captured in a
CUDA graph.

Fused RMSNorm in front (`norm_weight=`, `norm_eps=`, `norm_out=`): the pre-norm blocks' `rms_norm(h, w_norm,
eps, out=xn); linear(xn, W, out=y)` becomes one call, `linear(h, W, out=y, norm_weight=w_norm, norm_eps=eps,
norm_out=xn)`. The input is first normalised exactly as `ops.rmsnorm.rms_norm_ref(x, norm_weight, norm_eps)`
(fp32 norm, rounded to x.dtype, times norm_weight rounded again), then projected. The GEMV kernel (n <= 8) does the
norm on the fly, one launch, and leaves `norm_out` unspecified (not written); every other path (MMA, torch,
n > 8, CPU, fallbacks) runs `rms_norm(x, norm_weight, norm_eps, out=norm_out)` and then the plain projection of
norm_out, so no path allocates. norm_out is required (x's shape and dtype, not overlapping anything else).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seseme_cli.ops.kernels import dtype_code, has_cuda_kernels, kernels_module, overlaps, stream_handle
from seseme_cli.ops.linear_config import (MMA_MAX_N, LinearConfig, as_config, default_config, sm_count,
                                          workspace_bytes)
from seseme_cli.ops.rmsnorm import rms_norm, rms_norm_ref
from seseme_cli.ops.silu_mul import silu_mul

Tensor = torch.Tensor
KERNEL_DTYPES = (torch.bfloat16, torch.float16)
# ---------------------------------------------------------------------------------------------- linear


def linear(x: Tensor, weight: Tensor, out: Tensor | None = None, residual: Tensor | None = None,
           config: LinearConfig | dict | None = None, workspace: Tensor | None = None, *,
           norm_weight: Tensor | None = None, norm_eps: float = 1e-5, norm_out: Tensor | None = None) -> Tensor:
    """out = x @ weight.T (+ residual), fp32 accumulation, rounded once.

    x: (..., k); weight: (m, k) as nn.Linear stores it; residual: (..., m) or None; out: (..., m) or None
    (allocated). Same dtype everywhere. out may be residual itself (the in-place "x = x + W h" update), never
    overlap x or weight. config: see LinearConfig (validated when given); workspace: see the module doc.
    norm_weight (k,) / norm_eps / norm_out (like x): x is replaced by rms_norm(x, norm_weight, norm_eps) first;
    norm_out is then required and its content afterwards unspecified (see the module doc). Returns out.
    """
    return _dispatch(x, weight, out, residual, config, workspace, False, norm_weight, norm_eps, norm_out)


def linear_ref(x: Tensor, weight: Tensor, out: Tensor | None = None, residual: Tensor | None = None,
               config: LinearConfig | dict | None = None, workspace: Tensor | None = None, *,
               norm_weight: Tensor | None = None, norm_eps: float = 1e-5, norm_out: Tensor | None = None) -> Tensor:
    """`linear` in plain PyTorch, rounded as the reference model rounds: F.linear, then + residual (with
    norm_weight: rms_norm_ref into norm_out first, then the projection of norm_out)."""
    _check_args(x, weight, out, residual, config, False, norm_weight, norm_out)
    if norm_weight is not None:
        x = rms_norm_ref(x, norm_weight, norm_eps, out=norm_out)
    y = F.linear(x, weight)
    if residual is not None:
        y = residual + y
    return y if out is None else out.copy_(y)


def swiglu_linear(x: Tensor, weight_gate_up: Tensor, out: Tensor | None = None,
                  config: LinearConfig | dict | None = None, workspace: Tensor | None = None, *,
                  norm_weight: Tensor | None = None, norm_eps: float = 1e-5,
                  norm_out: Tensor | None = None) -> Tensor:
    """out = silu(x @ W_gate.T) * (x @ W_up.T) with weight_gate_up = cat([W_gate, W_up]) of shape (2f, k).

    x: (..., k); out: (..., f) or None. fp32 inside, rounded once. Otherwise (the fused RMSNorm too) as `linear`.
    """
    return _dispatch(x, weight_gate_up, out, None, config, workspace, True, norm_weight, norm_eps, norm_out)


def swiglu_linear_ref(x: Tensor, weight_gate_up: Tensor, out: Tensor | None = None,
                      config: LinearConfig | dict | None = None, workspace: Tensor | None = None, *,
                      norm_weight: Tensor | None = None, norm_eps: float = 1e-5,
                      norm_out: Tensor | None = None) -> Tensor:
    """`swiglu_linear` in plain PyTorch, as the reference MLP computes it: silu(gate(x)) * up(x) (with
    norm_weight: of x = rms_norm_ref(x) written to norm_out)."""
    _check_args(x, weight_gate_up, out, None, config, True, norm_weight, norm_out)
    if norm_weight is not None:
        x = rms_norm_ref(x, norm_weight, norm_eps, out=norm_out)
    w_gate, w_up = weight_gate_up.chunk(2, dim=0)
    y = F.silu(F.linear(x, w_gate)) * F.linear(x, w_up)
    return y if out is None else out.copy_(y)


# ---------------------------------------------------------------------------------------------- dispatch


def _dispatch(x: Tensor, weight: Tensor, out: Tensor | None, residual: Tensor | None,
              config: LinearConfig | dict | None, workspace: Tensor | None, swiglu: bool,
              norm_weight: Tensor | None = None, norm_eps: float = 1e-5, norm_out: Tensor | None = None) -> Tensor:
    cfg = _check_args(x, weight, out, residual, config, swiglu, norm_weight, norm_out)
    if workspace is not None and (workspace.device != x.device or not workspace.is_contiguous()):
        raise ValueError(f"linear: workspace must be a contiguous tensor on {x.device}, got one on {workspace.device}")
    k = x.shape[-1]
    m = weight.shape[0] // (2 if swiglu else 1)
    n = x.numel() // k
    applies = _kernel_applies(x, weight, out, residual)
    if applies and n > 0 and cfg is None:
        cfg = default_config(n, m, k, swiglu, split_ok=workspace is not None, sms=sm_count(x.device))
    if norm_weight is not None and not (applies and n > 0 and cfg.kernel == "gemv"
                                        and norm_fuses(x, norm_weight)):
        # Unfused: the norm kernel into norm_out, then the plain projection of norm_out.
        rms_norm(x, norm_weight, norm_eps, out=norm_out)
        return _dispatch(norm_out, weight, out, residual, cfg, workspace, swiglu)
    if not applies:
        if n > MMA_MAX_N and x.is_cuda and out is not None and out.is_contiguous() \
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
            if swiglu:
                return _swiglu_one_gemm(x, weight, out)
            # Above the kernel's rows: cuBLAS straight into out, the residual added by the GEMM itself (beta = 1),
            # rounded once as the kernels round. The reference's separate add and copy into out were most of the
            # 283 elementwise kernels and 280 copies (0.70 + 0.54 ms) of a batch-512 frame (BENCHMARKS.md run 19).
            return _cublas_linear(x, weight, out, residual)
        if swiglu:
            return swiglu_linear_ref(x, weight, out, cfg)
        return linear_ref(x, weight, out, residual, cfg)
    if out is None:
        out = torch.empty((*x.shape[:-1], m), dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    ws_ptr, ws_bytes = (0, 0)
    if workspace is not None:
        ws_ptr, ws_bytes = workspace.data_ptr(), workspace.numel() * workspace.element_size()
    need = workspace_bytes(n, m, k, swiglu, cfg)
    if need > ws_bytes:
        raise ValueError(f"linear: config {cfg} splits K and needs a zeroed workspace of >= {need} bytes "
                         f"(linear_workspace), got {ws_bytes}")
    if cfg.kernel == "torch":
        return _cublas_linear(x, weight, out, residual)
    index = x.device.index
    args = (out.data_ptr(), x.data_ptr(), weight.data_ptr(), 0 if residual is None else residual.data_ptr(),
            ws_ptr, ws_bytes, n, m, k, swiglu, dtype_code(x.dtype), *cfg.codes(), stream_handle(index),
            0 if norm_weight is None else norm_weight.data_ptr(), float(norm_eps))
    if index == torch.cuda.current_device():
        kernels_module().linear(*args)
    else:
        with torch.cuda.device(index):  # the launch goes to the current device's context
            kernels_module().linear(*args)
    return out


def _cublas_linear(x: Tensor, weight: Tensor, out: Tensor, residual: Tensor | None) -> Tensor:
    """out = x @ weight.T (+ residual) as one cuBLAS call into out (contiguous), fp32 accumulation, rounded once."""
    n, k, m = x.numel() // x.shape[-1], x.shape[-1], weight.shape[0]
    x2, out2 = x.reshape(n, k), out.view(n, m)
    if residual is None:
        torch.mm(x2, weight.t(), out=out2)
    else:
        torch.addmm(residual.reshape(n, m), x2, weight.t(), out=out2)  # out may be residual: beta = 1 in place
    return out


def _swiglu_one_gemm(x: Tensor, weight_gate_up: Tensor, out: Tensor) -> Tensor:
    """SwiGLU above the MMA kernel's rows (prefill chunks, batches > 64): one cuBLAS GEMM for gate and up together
    (one launch and one pass over x instead of two), then silu of the gate half times the up half in one pass
    (ops.silu_mul) straight into out. The reference's roundings: gate, up, silu and product each rounded to the
    dtype. Why: the profile of a batch-512 frame (H100, 21.4 ms) showed 563 elementwise kernels (2.5 ms) and 593
    device copies (1.6 ms), many of them the two-GEMM reference's product and copy into out. PyTorch's silu in
    place and multiply over the strided halves were 3.5 ms of a batch-512 frame (BENCHMARKS.md run 18b);
    ops.silu_mul does both in one pass (20.3 -> 18.0 ms per batch-512 step on an H100, run 19a)."""
    y = torch.mm(x.reshape(-1, x.shape[-1]), weight_gate_up.t())
    silu_mul(y, out.view(-1, weight_gate_up.shape[0] // 2))
    return out


def _check_args(x: Tensor, weight: Tensor, out: Tensor | None, residual: Tensor | None,
                config: LinearConfig | dict | None, swiglu: bool, norm_weight: Tensor | None = None,
                norm_out: Tensor | None = None) -> LinearConfig | None:
    name = "swiglu_linear" if swiglu else "linear"
    if x.dim() < 1 or weight.dim() != 2 or x.shape[-1] != weight.shape[1] or x.shape[-1] == 0:
        raise ValueError(f"{name}: need x (..., k) and weight (m, k) with k > 0, got x {tuple(x.shape)} "
                         f"and weight {tuple(weight.shape)}")
    if swiglu and weight.shape[0] % 2:
        raise ValueError(f"{name}: weight_gate_up must have an even number of rows (cat of gate and up), "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"{name}: weight is {weight.dtype} on {weight.device}, x {x.dtype} on {x.device}")
    m = weight.shape[0] // (2 if swiglu else 1)
    shape = (*x.shape[:-1], m)
    for what, t in (("residual", residual), ("out", out)):
        if t is not None and (t.shape != shape or t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name}: {what} must be {shape} {x.dtype} on {x.device}, "
                             f"got {tuple(t.shape)} {t.dtype} on {t.device}")
    if out is not None:
        if overlaps(out, x) or overlaps(out, weight):
            raise ValueError(f"{name}: out must not overlap x or weight")
        if residual is not None and overlaps(out, residual) and (
                out.data_ptr() != residual.data_ptr() or out.stride() != residual.stride()):
            raise ValueError(f"{name}: out must be residual itself or not overlap it")
    if norm_weight is not None or norm_out is not None:
        check_norm_args(name, x, weight, out, residual, norm_weight, norm_out)
    cfg = as_config(config)
    if cfg is not None and x.numel() > 0:
        cfg.check(x.numel() // x.shape[-1], m, x.shape[-1], swiglu)
    return cfg


def check_norm_args(name: str, x: Tensor, weight: Tensor, out: Tensor | None, residual: Tensor | None,
                     norm_weight: Tensor | None, norm_out: Tensor | None) -> None:
    if norm_weight is None:
        raise ValueError(f"{name}: norm_out given without norm_weight")
    k = x.shape[-1]
    if norm_weight.shape != (k,) or norm_weight.dtype != x.dtype or norm_weight.device != x.device:
        raise ValueError(f"{name}: norm_weight must be ({k},) {x.dtype} on {x.device}, got "
                         f"{tuple(norm_weight.shape)} {norm_weight.dtype} on {norm_weight.device}")
    if norm_out is None:
        raise ValueError(f"{name}: norm_weight needs norm_out, a buffer like x ({tuple(x.shape)} {x.dtype}) for "
                         "the normalised input (the unfused paths write it; none allocates)")
    if norm_out.shape != x.shape or norm_out.dtype != x.dtype or norm_out.device != x.device:
        raise ValueError(f"{name}: norm_out must be {tuple(x.shape)} {x.dtype} on {x.device}, "
                         f"got {tuple(norm_out.shape)} {norm_out.dtype} on {norm_out.device}")
    for what, t in (("x", x), ("weight", weight), ("out", out), ("residual", residual), ("norm_weight", norm_weight)):
        if t is not None and overlaps(norm_out, t):
            raise ValueError(f"{name}: norm_out must not overlap {what}")


def norm_fuses(x: Tensor, norm_weight: Tensor) -> bool:
    """Whether the GEMV kernel can take norm_weight (x already passed _kernel_applies)."""
    return norm_weight.is_contiguous() and norm_weight.data_ptr() % 16 == 0


def _kernel_applies(x: Tensor, weight: Tensor, out: Tensor | None, residual: Tensor | None) -> bool:
    """Whether the dispatcher launches a kernel (the arguments already checked)."""
    k = x.shape[-1]
    inputs = [t for t in (x, weight, residual) if t is not None]
    return (
        x.is_cuda
        and x.dtype in KERNEL_DTYPES
        and k % 8 == 0
        and x.numel() // k <= MMA_MAX_N
        and all(t.is_contiguous() for t in (*inputs, out) if t is not None)
        and x.data_ptr() % 16 == 0
        and weight.data_ptr() % 16 == 0
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs))  # the kernels have no backward
        and has_cuda_kernels()
    )
