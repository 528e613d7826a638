"""`python -m seseme_cli` = the `seseme` command."""

from seseme_cli.cli.main import app

app(prog_name="seseme")
