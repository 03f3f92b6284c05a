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


# ---------------------------------------------------------------- ingest
_INGEST_SRC = typer.Argument(..., help="device files and/or folders to walk (.vol, .e2e, .fds/.fda, DICOM, stacks)")
_INGEST_OUT = typer.Option(..., "--out", "-o", help="corpus directory (created when absent, else appended to)")
_INGEST_GRID = typer.Option("49,128,512", "--grid", help="corpus grid NB,D,W that raster volumes are resampled to")
_INGEST_WORKERS = typer.Option(None, "--workers", "-j", help="parallel file workers (default: all CPU cores)")
_INGEST_STRICT = typer.Option(False, "--strict", help="exit non-zero if any file was rejected (after finishing)")
_INGEST_EPHEMERAL = typer.Option(
    False, "--ephemeral-key", help="no OCTSSL_PSEUDONYM_KEY: use a throw-away pseudonym key (pseudonyms then "
    "match no other ingest)")
_INGEST_DEPTH = typer.Option(1.0, "--depth-mm", help="depth window kept around the retina before resizing to D")
_INGEST_BATCH = typer.Option(16, "--batch-size", help="volumes per atomic corpus append")


@app.command()
def ingest(
    sources: list[Path] = _INGEST_SRC,
    out: Path = _INGEST_OUT,
    grid: str = _INGEST_GRID,
    workers: int | None = _INGEST_WORKERS,
    strict: bool = _INGEST_STRICT,
    ephemeral_key: bool = _INGEST_EPHEMERAL,
    depth_mm: float = _INGEST_DEPTH,
    batch_size: int = _INGEST_BATCH,
) -> None:
    """Ingest device exports into a corpus: PHI replaced by keyed pseudonyms, bad files to rejects.parquet."""
    import os

    from octssl.data.ingest import pipeline
    from octssl.data.ingest.phi import EPHEMERAL_WARNING, KEY_ENV

    def rejected(path: str, reason: str) -> None:
        console.print(f"[yellow]rejected[/] {path}: {reason}")

    try:
        shape = pipeline.parse_grid(grid)
        if ephemeral_key and not os.environ.get(KEY_ENV):
            console.print(f"[bold red]WARNING:[/] {EPHEMERAL_WARNING}")
        report = pipeline.ingest(sources, out, grid=shape, workers=workers, ephemeral_key=ephemeral_key,
                                 batch_size=batch_size, depth_mm=depth_mm, on_reject=rejected)
    except OctsslError as err:
        _fail(err)
    mb = report.bytes_read / 2**20
    console.print(
        f"[green]ingested[/] {len(report.ingested)} volumes from {report.units} files/stacks into {out} "
        f"({mb:.1f} MiB in {report.seconds:.1f} s, {report.executor}); skipped {len(report.skipped)} already "
        f"ingested; rejected {len(report.rejected)}" + (f" (see {out}/rejects.parquet)" if report.rejected else "")
    )
    if strict and report.rejected:
        console.print(f"[bold red]--strict:[/] {len(report.rejected)} file(s) rejected")
        raise typer.Exit(1)
