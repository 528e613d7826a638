"""`python -m seseme_cli` = the `seseme` command."""

from .cli import app

app(prog_name="seseme")
