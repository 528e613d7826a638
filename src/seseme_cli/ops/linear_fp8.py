"""Weight-only fp8 (e4m3) decode projections: the GEMV reading half the weight bytes of bf16.

A weight W (m, k) is stored as w8 (m, k) torch.float8_e4m3fn and an fp32 scale per output channel (row of W):
W ~= w8.float() * scale[:, None], scale = max|W[row]| / 448 (`quantize_fp8`; 448 is e4m3's largest value).
Activations stay bf16; only the weights are quantized.

    w8, scale = quantize_fp8(w_qkv)
    linear_fp8(x, w8, scale, out=qkv)                       # qkv = x @ (w8 * scale[:, None]).T
    linear_fp8(attn, w8_o, scale_o, out=x, residual=x)      # in place
    swiglu_linear_fp8(h, w8_gate_up, scale_gate_up, out=act)

`linear_fp8` / `swiglu_linear_fp8` run the GEMV kernel's fp8 variant (cuda/linear_gemv.cu, FP8) for n <= 8 rows
of bf16 x with k % 16 == 0; the fused RMSNorm prologue (`norm_weight=`, `norm_eps=`, `norm_out=`) works as in
ops.linear. Everything else (CPU, n > 8, other dtypes, k % 16 != 0, unaligned tensors, autograd) goes to the
references beside them, `linear_fp8_ref` / `swiglu_linear_fp8_ref`: dequantize, compute in fp32, round once, as
the kernel does (the kernel sums w8 * x in fp32 and multiplies each row's sum by its scale). The references
allocate (the dequantized weight); the kernel path allocates nothing when `out` is given and never syncs.
For n > 8 the engine keeps a dequantized bf16 copy of each weight and runs ops.linear on it (engine/pack.py).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from seseme_cli.ops.kernels import dtype_code, has_cuda_kernels, kernels_module, overlaps, stream_handle
from seseme_cli.ops.linear import check_norm_args, norm_fuses
from seseme_cli.ops.linear_config import GEMV_MAX_N, LinearConfig, as_config, config_error, gemv_config, sm_count
from seseme_cli.ops.rmsnorm import rms_norm, rms_norm_ref

Tensor = torch.Tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value


# ---------------------------------------------------------------------------------------------- quantization


def quantize_fp8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel e4m3 quantization of weight (..., m, k): (w8 (..., m, k) float8_e4m3fn, scale (..., m)
    float32) with scale = amax of the row / 448 (1 for an all-zero row), w8 = round-to-nearest(row / scale).
    Leading dims are kept (the depth decoder's heads quantize as (31, vocab, dim))."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    # amax / scale can come out a hair above 448 in fp32; e4m3fn has no infinity and the cast is not saturating.
    w8 = (w / scale[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return w8, scale


def dequantize_fp8(w8: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """w8.float() * scale[..., None], in fp32, then cast to dtype."""
    return (w8.float() * scale[..., None]).to(dtype)


# ---------------------------------------------------------------------------------------------- configs


@functools.lru_cache(maxsize=1024)
def default_fp8_config(n: int, m: int, k: int, swiglu: bool = False, *, sms: int = 132) -> LinearConfig:
    """The built-in GEMV config for x (n, k), fp8 weights and m output columns (f for swiglu).

    The GEMV rules of ops.linear.default_config, stated in 16-byte packs: an fp8 row of k weights is k / 16
    packs, as many as a bf16 row of k / 2. Not yet swept on a GPU (scripts/fp8_gemv_sweep.py does that).
    """
    packs = max(1, k // 16)
    return gemv_config(n, m, packs, swiglu, short_rows=packs <= 256, sms=sms)


def _fp8_config_error(cfg: LinearConfig, n: int, m: int, k: int, swiglu: bool) -> str | None:
    """The rules of linear_fp8_config_error in cuda/linear.cuh."""
    if cfg.kernel != "gemv":
        return "only the GEMV kernel takes fp8 weights"
    if k % 16:
        return "k must be a multiple of 16 for the fp8 GEMV"
    return config_error(cfg, n, m, k, swiglu)


# ---------------------------------------------------------------------------------------------- ops


def linear_fp8(x: Tensor, weight: Tensor, scale: Tensor, out: Tensor | None = None, residual: Tensor | None = None,
               config: LinearConfig | dict | None = None, *, norm_weight: Tensor | None = None,
               norm_eps: float = 1e-5, norm_out: Tensor | None = None) -> Tensor:
    """out = x @ (weight * scale[:, None]).T (+ residual): fp32 accumulation, one rounding to x.dtype.

    x: (..., k); weight: (m, k) float8_e4m3fn; scale: (m,) float32; residual, out: (..., m) in x.dtype or None.
    out may be residual itself, never overlap x. config: a GEMV LinearConfig (validated when given; None:
    default_fp8_config). norm_weight / norm_eps / norm_out: as ops.linear.linear. Returns out.
    """
    return _dispatch(x, weight, scale, out, residual, config, False, norm_weight, norm_eps, norm_out)


def linear_fp8_ref(x: Tensor, weight: Tensor, scale: Tensor, out: Tensor | None = None,
                   residual: Tensor | None = None, config: LinearConfig | dict | None = None, *,
                   norm_weight: Tensor | None = None, norm_eps: float = 1e-5,
                   norm_out: Tensor | None = None) -> Tensor:
    """`linear_fp8` in plain PyTorch: the dequantized weight, an fp32 product (+ residual), rounded once (with
    norm_weight: rms_norm_ref into norm_out first, then the projection of norm_out)."""
    _check_args(x, weight, scale, out, residual, config, False, norm_weight, norm_out)
    if norm_weight is not None:
        x = rms_norm_ref(x, norm_weight, norm_eps, out=norm_out)
    y = F.linear(x.float(), dequantize_fp8(weight, scale))
    if residual is not None:
        y = y + residual.float()
    y = y.to(x.dtype)
    return y if out is None else out.copy_(y)


def swiglu_linear_fp8(x: Tensor, weight_gate_up: Tensor, scale: Tensor, out: Tensor | None = None,
                      config: LinearConfig | dict | None = None, *, norm_weight: Tensor | None = None,
                      norm_eps: float = 1e-5, norm_out: Tensor | None = None) -> Tensor:
    """out = silu(x @ W_gate.T) * (x @ W_up.T), W = weight_gate_up * scale[:, None] of shape (2f, k) (the rows
    of gate, then of up, each with its own scale). x: (..., k); out: (..., f). Otherwise as `linear_fp8`."""
    return _dispatch(x, weight_gate_up, scale, out, None, config, True, norm_weight, norm_eps, norm_out)


def swiglu_linear_fp8_ref(x: Tensor, weight_gate_up: Tensor, scale: Tensor, out: Tensor | None = None,
                          config: LinearConfig | dict | None = None, *, norm_weight: Tensor | None = None,
                          norm_eps: float = 1e-5, norm_out: Tensor | None = None) -> Tensor:
    """`swiglu_linear_fp8` in plain PyTorch: gate and up in fp32 from the dequantized weight, silu(gate) * up in
    fp32, rounded once."""
    _check_args(x, weight_gate_up, scale, out, None, config, True, norm_weight, norm_out)
    if norm_weight is not None:
        x = rms_norm_ref(x, norm_weight, norm_eps, out=norm_out)
    gate, up = F.linear(x.float(), dequantize_fp8(weight_gate_up, scale)).chunk(2, dim=-1)
    y = (F.silu(gate) * up).to(x.dtype)
    return y if out is None else out.copy_(y)


# ---------------------------------------------------------------------------------------------- dispatch


def _dispatch(x: Tensor, weight: Tensor, scale: Tensor, out: Tensor | None, residual: Tensor | None,
              config: LinearConfig | dict | None, swiglu: bool, norm_weight: Tensor | None, norm_eps: float,
              norm_out: Tensor | None) -> Tensor:
    cfg = _check_args(x, weight, scale, out, residual, config, swiglu, norm_weight, norm_out)
    k = x.shape[-1]
    m = weight.shape[0] // (2 if swiglu else 1)
    n = x.numel() // k
    if not _kernel_applies(x, weight, scale, out, residual):
        if norm_weight is not None:  # the norm kernel (where it runs) into norm_out, then the reference projection
            x = rms_norm(x, norm_weight, norm_eps, out=norm_out)
        ref = swiglu_linear_fp8_ref if swiglu else linear_fp8_ref
        return ref(x, weight, scale, out, *(() if swiglu else (residual,)))
    if out is None:
        out = torch.empty((*x.shape[:-1], m), dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    cfg = cfg or default_fp8_config(n, m, k, swiglu, sms=sm_count(x.device))
    if norm_weight is not None and not norm_fuses(x, norm_weight):
        x = rms_norm(x, norm_weight, norm_eps, out=norm_out)
        norm_weight = None
    index = x.device.index
    args = (out.data_ptr(), x.data_ptr(), weight.data_ptr(), scale.data_ptr(),
            0 if residual is None else residual.data_ptr(), n, m, k, swiglu, dtype_code(x.dtype), *cfg.codes(),
            stream_handle(index), 0 if norm_weight is None else norm_weight.data_ptr(), float(norm_eps))
    if index == torch.cuda.current_device():
        kernels_module().linear_fp8(*args)
    else:
        with torch.cuda.device(index):  # the launch goes to the current device's context
            kernels_module().linear_fp8(*args)
    return out


def _check_args(x: Tensor, weight: Tensor, scale: Tensor, out: Tensor | None, residual: Tensor | None,
                config: LinearConfig | dict | None, swiglu: bool, norm_weight: Tensor | None,
                norm_out: Tensor | None) -> LinearConfig | None:
    name = "swiglu_linear_fp8" if swiglu else "linear_fp8"
    if x.dim() < 1 or weight.dim() != 2 or x.shape[-1] != weight.shape[1] or x.shape[-1] == 0:
        raise ValueError(f"{name}: need x (..., k) and weight (m, k) with k > 0, got x {tuple(x.shape)} "
                         f"and weight {tuple(weight.shape)}")
    if weight.dtype != FP8_DTYPE or not x.is_floating_point():
        raise ValueError(f"{name}: weight must be {FP8_DTYPE} (quantize_fp8) and x floating point, got weight "
                         f"{weight.dtype} and x {x.dtype}")
    if scale.shape != weight.shape[:1] or scale.dtype != torch.float32:
        raise ValueError(f"{name}: scale must be ({weight.shape[0]},) float32 (one per weight row), got "
                         f"{tuple(scale.shape)} {scale.dtype}")
    if weight.device != x.device or scale.device != x.device:
        raise ValueError(f"{name}: weight on {weight.device} and scale on {scale.device}, x on {x.device}")
    if swiglu and weight.shape[0] % 2:
        raise ValueError(f"{name}: weight_gate_up must have an even number of rows (cat of gate and up), "
                         f"got {tuple(weight.shape)}")
    m = weight.shape[0] // (2 if swiglu else 1)
    shape = (*x.shape[:-1], m)
    for what, t in (("residual", residual), ("out", out)):
        if t is not None and (t.shape != shape or t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name}: {what} must be {shape} {x.dtype} on {x.device}, "
                             f"got {tuple(t.shape)} {t.dtype} on {t.device}")
    if out is not None:
        if overlaps(out, x):
            raise ValueError(f"{name}: out must not overlap x")
        if residual is not None and overlaps(out, residual) and (
                out.data_ptr() != residual.data_ptr() or out.stride() != residual.stride()):
            raise ValueError(f"{name}: out must be residual itself or not overlap it")
    if norm_weight is not None or norm_out is not None:
        check_norm_args(name, x, weight, out, residual, norm_weight, norm_out)
    cfg = as_config(config)
    if cfg is not None and x.numel() > 0:
        err = _fp8_config_error(cfg, x.numel() // x.shape[-1], m, x.shape[-1], swiglu)
        if err is not None:
            raise ValueError(f"{name}: config {cfg} cannot run n={x.numel() // x.shape[-1]}, m={m}, "
                             f"k={x.shape[-1]}, swiglu={swiglu}: {err}")
    return cfg


@functools.cache
def _module_has_fp8() -> bool:
    return has_cuda_kernels() and hasattr(kernels_module(), "linear_fp8")


def _kernel_applies(x: Tensor, weight: Tensor, scale: Tensor, out: Tensor | None, residual: Tensor | None) -> bool:
    """Whether the dispatcher launches the fp8 GEMV (the arguments already checked)."""
    k = x.shape[-1]
    inputs = [t for t in (x, weight, scale, residual) if t is not None]
    return (
        x.is_cuda
        and x.dtype == torch.bfloat16
        and k % 16 == 0
        and x.numel() // k <= GEMV_MAX_N
        and all(t.is_contiguous() for t in (*inputs, out) if t is not None)
        and x.data_ptr() % 16 == 0
        and weight.data_ptr() % 16 == 0
        and not (torch.is_grad_enabled() and x.requires_grad)  # the kernel has no backward
        and _module_has_fp8()
    )
