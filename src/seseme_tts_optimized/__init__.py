"""Alias of `seseme_cli` under the name the seed's examples import."""

from seseme_cli import CSM, Segment, SesemeError, __version__, load_csm_1b_optimized

__all__ = ["CSM", "Segment", "SesemeError", "load_csm_1b_optimized", "__version__"]
