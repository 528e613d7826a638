"""What every `seseme` command shares: the consoles and verbosity, the CLI edge that turns errors into one line,
signals as errors, the device choice and the model load.

Nothing heavy is imported at module level: `seseme --help` imports this module, and torch alone takes seconds.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from enum import Enum

import typer
from rich.console import Console

from seseme_cli.errors import InputError, SesemeError

# Mimi's rate; context audio is read at it before the model (and so its codec) is loaded.
SAMPLE_RATE = 24_000
COMMAND_STARTED = time.perf_counter()  # "from the start" in say's report (the CLI imports this module first)

# soft_wrap: a long message stays one line instead of being wrapped at the terminal width.
out = Console(highlight=False, soft_wrap=True)  # results (standard output)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # errors and warnings: never silenced
note = Console(stderr=True, highlight=False, soft_wrap=True)  # progress and information: silenced by -q


class Verbosity(int, Enum):
    quiet = -1
    normal = 0
    verbose = 1


_verbosity = Verbosity.normal


def set_verbosity(level: Verbosity) -> None:
    """-q / -v of the main command: -q silences progress and information (errors and warnings stay), -v adds the
    engine's debug log."""
    global _verbosity
    _verbosity = level
    note.quiet = level is Verbosity.quiet
    log = logging.getLogger("seseme")
    log.setLevel({Verbosity.quiet: logging.WARNING, Verbosity.normal: logging.INFO,
                  Verbosity.verbose: logging.DEBUG}[level])
    if not any(isinstance(h, _LogToConsole) for h in log.handlers):
        log.addHandler(_LogToConsole())


def quiet() -> bool:
    return _verbosity is Verbosity.quiet


def info(message: str) -> None:
    note.print(message, style="dim", markup=False)


def warn(message: str) -> None:
    err.print(f"warning: {message}", style="yellow", markup=False)


def status(message: str):
    """A spinner on stderr (nothing with -q); `.update(text)` works either way."""
    return note.status(message) if not quiet() else _NoStatus()


class _NoStatus(contextlib.nullcontext):
    def __enter__(self):
        return self

    def update(self, *args, **kwargs) -> None:
        pass


class _LogToConsole(logging.Handler):
    """The engine's log (logger "seseme") on stderr: warnings as `warning: ...` lines, information (which kernel
    tuning the engine loaded) and debug lines dim. The logger's level (set_verbosity) decides what reaches here."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            warn(record.getMessage())
        else:
            info(record.getMessage())


# --- the CLI edge -----------------------------------------------------------------------------------------

def one_line(message: str) -> str:
    return " ".join(str(message).split())


@contextlib.contextmanager
def user_errors():
    """Show a SesemeError as one line and exit with its code; anything else is a bug and keeps its traceback."""
    try:
        yield
    except SesemeError as e:
        err.print(f"error: {one_line(e)}", style="bold red", markup=False)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        err.print("error: interrupted", style="bold red", markup=False)
        raise typer.Exit(130) from None


class Stopped(SesemeError):
    """SIGTERM or SIGINT, raised in the main thread so that the work unwinds (temp files removed) and the exit
    code is the shell's 128 + signal number."""

    def __init__(self, signum: int):
        self.exit_code = 128 + signum
        super().__init__("interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}")


@contextlib.contextmanager
def signals_raise():
    """While inside: SIGTERM and SIGINT raise Stopped in the main thread. Python's default for SIGTERM ends the
    process at once, leaving temp files behind. After the first signal, more are ignored until the work has
    unwound, so a second Ctrl+C cannot cut the clean-up short."""
    def stop(signum, frame):
        for s in old:
            signal.signal(s, signal.SIG_IGN)
        raise Stopped(signum)

    try:
        old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread (an embedding caller's worker): nothing to install
        old = {}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


# --- device and model -------------------------------------------------------------------------------------

class Device(str, Enum):
    cuda = "cuda"
    cpu = "cpu"


def pick_device(device: Device | None) -> str:
    import torch

    if device is Device.cuda and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU is available here (use --device cpu)")
    return device.value if device else ("cuda" if torch.cuda.is_available() else "cpu")


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise InputError("--batch-sizes needs at least one size, each >= 1")
    return sizes


def check_parent(path, option: str) -> None:
    """An output file's folder must exist (outputs never create folders but batch's --out-dir)."""
    if path is not None and not path.parent.is_dir():
        raise InputError(f"{option} {path}: folder {path.parent} does not exist")
    if path is not None and path.is_dir():
        raise InputError(f"{option} {path}: it is a directory")


def write_text(path, text: str, option: str) -> None:
    """A small result file (--json): a failure (disk full) is one error line, not a traceback."""
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise InputError(f"cannot write {option} {path}: {e.strerror or e}") from None


def load_model(model: str, device_name: str):
    """Load the model with a status line, say so on stderr, and warn loudly about random weights."""
    from seseme_cli.api import load_csm_1b_optimized

    if not any(isinstance(h, _LogToConsole) for h in logging.getLogger("seseme").handlers):
        set_verbosity(_verbosity)  # a caller that skipped the main command's options (tests, cli/serve.py)
    started = time.perf_counter()
    with status(f"loading model {model} on {device_name}..."):
        tts = load_csm_1b_optimized(model, device=device_name)
    if tts.sample_rate != SAMPLE_RATE:
        raise SesemeError(f"the model's codec runs at {tts.sample_rate} Hz; seseme expects {SAMPLE_RATE} Hz")
    info(f"loaded {tts.description} on {device_name} in {time.perf_counter() - started:.1f} s")
    if tts.is_random:
        err.print(f"WARNING: --model {model} has RANDOM weights: the output is noise, not speech.",
                  style="bold red", markup=False)
    return tts
