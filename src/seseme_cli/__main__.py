"""`python -m seseme_cli` = the `seseme` command."""

from seseme_cli.cli.main import app

if __name__ == "__main__":  # not when a spawned process (the server's engine) imports it
    app(prog_name="seseme")
