"""The fast path: CUDA kernels, static memory and whole-frame CUDA graphs (see runner.Engine)."""

from seseme_cli.engine.runner import Engine

__all__ = ["Engine"]
