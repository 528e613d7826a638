"""seseme: a fast text-to-speech engine and command-line tool for Sesame's CSM-1B."""

from seseme_cli.errors import SesemeError
from seseme_cli.api import CSM, Segment, load_csm_1b_optimized

__version__ = "0.1.0"
__all__ = ["CSM", "Segment", "SesemeError", "load_csm_1b_optimized", "__version__"]
