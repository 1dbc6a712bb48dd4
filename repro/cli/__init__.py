"""The `repro` command line: the Typer commands (`app`) and the rows of `repro list` and `repro status` (`rows`)."""

from repro.cli.app import app

__all__ = ["app"]
