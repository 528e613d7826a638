"""User-facing errors.

Raised where a problem is detected; the CLI prints `str(err)` as one line and exits with `exit_code`.
Anything else that escapes is a bug and keeps its traceback.
"""


class SesemeError(Exception):
    """A problem the user can fix (bad input, missing weights, ...)."""

    exit_code = 1


class InputError(SesemeError):
    """Bad arguments or input files."""

    exit_code = 2


class WeightsNotFound(SesemeError):
    """The requested model could not be found locally and could not be downloaded."""

    exit_code = 1
