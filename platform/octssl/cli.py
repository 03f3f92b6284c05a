"""The `octssl` command line: thin typer commands that parse, load config and call the library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from octssl.errors import OctsslError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {err}")
    raise typer.Exit(2)


def main() -> None:
    try:
        app()
    except OctsslError as err:  # pragma: no cover - typer handles inside commands
        _fail(err)


# Commands are added below, one block per area; each imports its library lazily so that
# `octssl --help` stays fast.
