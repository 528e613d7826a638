"""The SwiGLU product after one GEMM for gate and up together: out = silu(gate) * up.

    y = x @ cat([W_gate, W_up]).T               # (rows, 2f), one GEMM
    silu_mul(y, out=act)                        # act (rows, f) = silu(y[:, :f]) * y[:, f:]

`silu_mul` runs cuda/silu_mul.cu where it applies (one pass, 16-byte packs), else `silu_mul_ref`, plain PyTorch
with the same signature and the same roundings (silu rounded to the dtype, then the product).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seseme_cli.ops.attention import call_kernel
from seseme_cli.ops.kernels import dtype_code, has_cuda_kernels, kernels_module, overlaps

Tensor = torch.Tensor
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def silu_mul(gate_up: Tensor, out: Tensor | None = None) -> Tensor:
    """gate_up (rows, 2f) -> out (rows, f) = silu(gate_up[:, :f]) * gate_up[:, f:], in gate_up's dtype.
    out: optional result (rows, f), written and returned (then nothing is allocated: graph-safe).
    The kernel runs for contiguous CUDA tensors in bf16/fp16/fp32 that do not overlap, outside autograd."""
    f = _check_args(gate_up, out)
    if out is None:
        out = torch.empty(gate_up.shape[0], f, dtype=gate_up.dtype, device=gate_up.device)
    if not silu_mul_applies(gate_up, out):
        return silu_mul_ref(gate_up, out)
    call_kernel(gate_up.device, kernels_module().silu_mul,
                (out.data_ptr(), gate_up.data_ptr(), gate_up.shape[0], f, dtype_code(gate_up.dtype)))
    return out


def silu_mul_ref(gate_up: Tensor, out: Tensor | None = None) -> Tensor:
    """`silu_mul` in plain PyTorch: same signature and semantics."""
    f = _check_args(gate_up, out)
    y = F.silu(gate_up[:, :f]) * gate_up[:, f:]
    return y if out is None else out.copy_(y)


def silu_mul_applies(gate_up: Tensor, out: Tensor) -> bool:
    """Whether the kernel takes these (checked) arguments."""
    return (has_cuda_kernels() and gate_up.is_cuda and out.device == gate_up.device
            and gate_up.dtype in KERNEL_DTYPES and gate_up.is_contiguous() and out.is_contiguous()
            and not overlaps(gate_up, out)
            and not (torch.is_grad_enabled() and gate_up.requires_grad))


def _check_args(gate_up: Tensor, out: Tensor | None) -> int:
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"silu_mul: gate_up must be (rows, 2f), got {tuple(gate_up.shape)}")
    rows, f = gate_up.shape[0], gate_up.shape[1] // 2
    if out is not None and (out.shape != (rows, f) or out.dtype != gate_up.dtype or out.device != gate_up.device):
        raise ValueError(f"silu_mul: out must be ({rows}, {f}) {gate_up.dtype} on {gate_up.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    return f

