"""seseme: a fast text-to-speech engine and command-line tool for Sesame's CSM-1B.

The public names are loaded on first use (PEP 562): `seseme --help` imports this package, and the API pulls in
torch, which alone takes seconds to import. `from seseme_cli import load_csm_1b_optimized, Segment, CSM` works
as before.
"""

from seseme_cli.errors import SesemeError

__version__ = "0.1.0"
__all__ = ["CSM", "Segment", "SesemeError", "load_csm_1b_optimized", "__version__"]

_FROM_API = ("CSM", "Segment", "load_csm_1b_optimized")


def __getattr__(name: str):
    if name in _FROM_API:
        from seseme_cli import api

        value = getattr(api, name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
