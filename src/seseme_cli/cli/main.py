"""The `seseme` command line: the app, its global options (--version, -q, -v) and its commands.

Each command lives in its own module (say, batch, bench, tune, doctor, serve/voice) and is imported only when it
runs or shows its own help: `seseme --help` lists the commands from the table below, so it never imports torch,
numpy or the engine (they take seconds). Problems are raised as SesemeError where they are found and shown as
one `error:` line by cli.common.user_errors; usage errors (a bad option value) get the same one line here.
"""

from __future__ import annotations

import importlib
import sys
from typing import Annotated, Optional

import typer
import typer.core

# Re-exported: cli/serve.py imports these from here.
from seseme_cli.cli.common import (SAMPLE_RATE, Device, Verbosity, err, load_model, one_line, out,  # noqa: F401
                                   pick_device, set_verbosity, user_errors)

# Newer typer carries its own copy of click as typer._click; older typer uses click itself.
click = getattr(typer.core, "_click", None) or importlib.import_module("click")
_NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2; before, click shows the help itself

# name -> (module, attribute, one line for `seseme --help`). A Typer attribute is a group of subcommands.
COMMANDS = {
    "say": ("seseme_cli.cli.say", "say", "Speak TEXT into an audio file, a stream or the speakers."),
    "batch": ("seseme_cli.cli.batch", "batch", "Speak many requests from a JSONL file, with continuous batching."),
    "serve": ("seseme_cli.cli.serve", "serve", "Serve OpenAI's /v1/audio/speech over HTTP."),
    "voice": ("seseme_cli.cli.serve", "voice_app", "Named voices for `seseme serve`: add, list, remove."),
    "bench": ("seseme_cli.cli.bench", "bench", "Measure generation speed on a GPU."),
    "tune": ("seseme_cli.cli.tune", "tune", "Autotune the CUDA kernels for this GPU."),
    "doctor": ("seseme_cli.cli.doctor", "doctor", "Check the install: kernels, GPU, torch, tuning, caches."),
}


class _Listed(typer.core.TyperCommand):
    """A command as `seseme --help` and shell completion list it: its name and one line, nothing imported."""

    def __init__(self, name: str, target: tuple[str, str], short_help: str):
        super().__init__(name, help=short_help, short_help=short_help)
        self.target = target

    def load(self):
        module, attribute = self.target
        try:
            found = getattr(importlib.import_module(module), attribute)
        except ImportError as e:  # e.g. the server's dependencies missing from a trimmed install
            raise click.exceptions.ClickException(f"`seseme {self.name}` is not available: {e}") from None
        if isinstance(found, typer.Typer):
            command = typer.main.get_group(found)
        else:
            single = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)
            single.command(self.name, short_help=self.short_help)(found)
            command = typer.main.get_command(single)
        command.name = self.name
        return command


class LazyGroup(typer.core.TyperGroup):
    """Commands are imported when they are resolved (to run, or for their own --help); listed from COMMANDS."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name, (module, attribute, short) in COMMANDS.items():
            self.commands.setdefault(name, _Listed(name, (module, attribute), short))

    def resolve_command(self, ctx, args):
        name, command, rest = super().resolve_command(ctx, args)
        if isinstance(command, _Listed):
            command = self.commands[name] = command.load()
        return name, command, rest

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """click's main, except that a usage error is one `error:` line (and the hint where --help is), like every
        other error of seseme, instead of a framed box."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NO_ARGS as e:  # `seseme` alone: the help, as before
            e.show()
            sys.exit(e.exit_code)
        except click.exceptions.ClickException as e:
            hint = f" (see `{self._help_for(e, args)} --help`)" if isinstance(e, click.exceptions.UsageError) else ""
            err.print(f"error: {one_line(e.format_message())}{hint}", style="bold red", markup=False)
            sys.exit(e.exit_code)
        except typer.Abort:
            err.print("error: aborted", style="bold red", markup=False)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def _help_for(self, e, args) -> str:
        """The command whose --help explains a usage error (some errors of the option parser carry no context)."""
        ctx = getattr(e, "ctx", None)
        if ctx is not None:
            return ctx.command_path
        words = [w for w in (sys.argv[1:] if args is None else args) if not str(w).startswith("-")]
        return f"seseme {words[0]}" if words and words[0] in self.commands else "seseme"


app = typer.Typer(
    cls=LazyGroup,
    help="seseme: fast text-to-speech with Sesame's CSM-1B.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_show_locals=False,
)


def _version(value: bool) -> None:
    if value:
        from seseme_cli.cli import doctor

        with user_errors():
            doctor.print_version()
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[Optional[bool], typer.Option(
        "--version", is_eager=True, callback=_version,
        help="Show the version, the kernels, torch, the GPU, the kernel tuning and the model cache, and exit.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and warnings on stderr.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also the engine's debug messages.")] = False,
) -> None:
    """seseme: fast text-to-speech with Sesame's CSM-1B."""
    if quiet and verbose:
        raise typer.BadParameter("give -q/--quiet or -v/--verbose, not both")
    set_verbosity(Verbosity.quiet if quiet else Verbosity.verbose if verbose else Verbosity.normal)
