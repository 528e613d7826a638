"""Fused operators: each `op` dispatches to a CUDA kernel when it can and to `op_ref` (plain PyTorch,
defined beside it) otherwise; both have the same signature and semantics."""

from seseme_cli.ops.rmsnorm import rms_norm, rms_norm_ref

__all__ = ["rms_norm", "rms_norm_ref"]
