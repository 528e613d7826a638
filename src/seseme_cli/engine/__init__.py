"""The fast path: CUDA kernels, static memory and whole-frame CUDA graphs (see runner.Engine)."""

from .runner import Engine

__all__ = ["Engine"]
