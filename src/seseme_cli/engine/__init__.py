"""The fast path: CUDA kernels, static memory and whole-frame CUDA graphs (see runner.Engine)."""

from .runner import Engine, engine_generate

__all__ = ["Engine", "engine_generate"]
