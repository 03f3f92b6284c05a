"""`octssl synth | ingest | label | info | verify | export-shards | publish`: corpora and shards."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from octssl.cli import _ERRORS, _fail, app, console
from octssl.errors import StorageError
from octssl.ingest.phi import EPHEMERAL_WARNING, KEY_ENV

# ---------------------------------------------------------------- shards
_EXPORT_CORPUS = typer.Argument(..., help="corpus directory (manifest.parquet + volumes.zarr)")
_EXPORT_OUT = typer.Option(..., "--out", "-o", help="folder or s3://BUCKET/PREFIX for shard-NNNNNN.tar and index.json")
_EXPORT_K = typer.Option(64, "--samples-per-shard", "-k", help="samples per tar shard")
_EXPORT_SPLIT = typer.Option(None, "--split", help="export only train, val or test (default: all)")
_EXPORT_ALL = typer.Option(False, "--all-scans", help="include non-raster scans (default: raster only)")
_EXPORT_OVERWRITE = typer.Option(False, "--overwrite", help="replace an earlier export in --out")
_EXPORT_WORKERS = typer.Option(1, "--workers", "-j", help="processes writing shards in parallel (same bytes as 1)")


@app.command("export-shards")
def export_shards_command(
    corpus: Path = _EXPORT_CORPUS,
    out: str = _EXPORT_OUT,
    samples_per_shard: int = _EXPORT_K,
    split: str | None = _EXPORT_SPLIT,
    all_scans: bool = _EXPORT_ALL,
    overwrite: bool = _EXPORT_OVERWRITE,
    workers: int = _EXPORT_WORKERS,
) -> None:
    """Write a corpus as WebDataset tar shards plus index.json (counts, checksums) for streaming."""
    from octssl.webds.export import export_shards

    try:
        index = export_shards(corpus, out, samples_per_shard=samples_per_shard, split=split,
                              raster_only=not all_scans, overwrite=overwrite, workers=workers)
    except _ERRORS as err:
        _fail(err)
    size = sum(shard["bytes"] for shard in index["shards"])
    console.print(f"[green]exported[/] {index['total']} samples into {len(index['shards'])} shards "
                  f"({size / 2**20:.1f} MiB) at {out}")


_PUBLISH_CORPUS = typer.Argument(..., help="local corpus directory")
_PUBLISH_URL = typer.Argument(..., help="destination s3://BUCKET/PREFIX (endpoint and keys from AWS_* variables); "
                              "with --icechunk also a local folder")
_PUBLISH_ICECHUNK = typer.Option(False, "--icechunk", help="commit into an icechunk repository (one object per "
                                 "volume, snapshots; publishing again commits only what is new)")


@app.command()
def publish(corpus: Path = _PUBLISH_CORPUS, url: str = _PUBLISH_URL, icechunk: bool = _PUBLISH_ICECHUNK) -> None:
    """Upload a corpus to object storage: data, then a read-back check, then the manifest (resumable)."""
    from octssl.corpus.publish import publish as publish_corpus

    if icechunk:
        from octssl.corpus.icechunk import publish as commit_corpus

        try:
            done = commit_corpus(corpus, url)
        except _ERRORS as err:
            _fail(err)
        said = "already published" if done["already"] else f"published ({done['arrays']} arrays written)"
        console.print(f"[green]{said}[/] {done['samples']} samples at {url}@{done['snapshot_id']}")
        return
    try:
        done = publish_corpus(corpus, url)
    except _ERRORS as err:
        _fail(err)
    if done["already"]:
        console.print(f"[green]already published[/] {done['samples']} samples at {url}")
        return
    console.print(f"[green]published[/] {done['samples']} samples ({done['files']} files, "
                  f"{done['uploaded_bytes'] / 2**20:.1f} MiB uploaded, {done['skipped']} already there) at {url}")


# ---------------------------------------------------------------- ingest
_INGEST_SRC = typer.Argument(..., help="device files and/or folders to walk (.vol, .e2e, .fds/.fda, DICOM, stacks)")
_INGEST_OUT = typer.Option(..., "--out", "-o", help="corpus directory (created when absent, else appended to)")
_INGEST_GRID = typer.Option("49,128,512", "--grid", help="corpus grid NB,D,W that raster volumes are resampled to")
_INGEST_WORKERS = typer.Option(None, "--workers", "-j", help="parallel file workers (default: all CPU cores)")
_INGEST_STRICT = typer.Option(False, "--strict", help="exit non-zero if any file was rejected (after finishing)")
_INGEST_EPHEMERAL = typer.Option(
    False, "--ephemeral-key", help="no OCTSSL_PSEUDONYM_KEY: use a throw-away pseudonym key (pseudonyms then "
    "match no other ingest)")
_INGEST_REAL_DATES = typer.Option(
    False, "--keep-real-dates", help="store real acquisition dates (default: each patient's dates shifted by a "
    "keyed offset, intervals exact; recorded in the corpus settings)")
_INGEST_DEPTH = typer.Option(1.0, "--depth-mm", help="depth window kept around the retina before resizing to D")
_INGEST_BATCH = typer.Option(16, "--batch-size", help="volumes per atomic corpus append")
_INGEST_PAIRS = typer.Option(None, "--pairs", help="pairs table (CSV) of en-face images/masks to attach after ingest")
_INGEST_PREVIEWS = typer.Option(16, "--previews", help="pictures of the first N volumes ingested, in "
                                "OUT/previews/<id>.png (B-scans, localizer with the scan positions); 0: none")
_INGEST_MAP = typer.Option([], "--map", help="eyepy .eye area/volume map NAME=KIND (ga|rpd) to ingest as a label "
                           "(repeatable)")


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
    pairs: Path | None = _INGEST_PAIRS,
    map_: list[str] = _INGEST_MAP,
    previews: int = _INGEST_PREVIEWS,
    keep_real_dates: bool = _INGEST_REAL_DATES,
) -> None:
    """Ingest device exports into a corpus: PHI replaced by keyed pseudonyms, bad files to rejects.parquet."""

    from octssl.ingest import pipeline

    def rejected(path: str, reason: str) -> None:
        console.print(f"[yellow]rejected[/] {path}: {reason}")

    try:
        shape = pipeline.parse_grid(grid)
        maps = pipeline.parse_maps(map_)
    except _ERRORS as err:  # a malformed --grid or --map: the command line is wrong (exit 2)
        raise typer.BadParameter(str(err)) from None
    try:
        if ephemeral_key and not os.environ.get(KEY_ENV):
            console.print(f"[bold red]WARNING:[/] {EPHEMERAL_WARNING}")
        report = pipeline.ingest(sources, out, grid=shape, workers=workers, ephemeral_key=ephemeral_key,
                                 batch_size=batch_size, depth_mm=depth_mm, on_reject=rejected, maps=maps,
                                 previews=previews, keep_real_dates=keep_real_dates)
    except _ERRORS as err:
        _fail(err)
    mb = report.bytes_read / 2**20
    console.print(
        f"[green]ingested[/] {len(report.ingested)} volumes from {report.units} files/stacks into {out} "
        f"({mb:.1f} MiB in {report.seconds:.1f} s, {report.executor}); skipped {len(report.skipped)} already "
        f"ingested; rejected {len(report.rejected)}" + (f" (see {out}/rejects.parquet)" if report.rejected else "")
        + (f"; look at {out}/previews/ ({len(report.previews)} pictures)" if report.previews else "")
    )
    labelled = None
    if pairs is not None:
        try:
            labelled = _label(out, pairs)
        except _ERRORS as err:
            _fail(err)
    if strict and (report.rejected or (labelled is not None and labelled.rejected)):
        console.print("[bold red]--strict:[/] file(s) or pairs row(s) rejected")
        raise typer.Exit(1)


def _label(corpus: Path, pairs: Path):
    """Attach a pairs table and print what happened (the rejects one per line)."""
    from octssl.ingest.pairs import label_corpus

    report = label_corpus(corpus, pairs)
    for where, reason in report.rejected:
        console.print(f"[yellow]rejected[/] {where}: {reason}")
    console.print(f"[green]attached[/] {len(report.attached)} en-face arrays from {pairs}; rejected "
                  f"{len(report.rejected)} pairs row(s)" + (f" (see {corpus}/rejects.parquet)" if report.rejected else ""))
    return report


_LABEL_CORPUS = typer.Argument(..., help="corpus directory")
_LABEL_PAIRS = typer.Argument(..., help="pairs table CSV: volume, kind, image, space[, matrix] (see docs/predict.md)")


@app.command()
def label(corpus: Path = _LABEL_CORPUS, pairs: Path = _LABEL_PAIRS, strict: bool = _INGEST_STRICT) -> None:
    """Attach en-face images and masks (FAF, SLO, GA, RPD) to volumes already in a corpus, from a pairs table."""
    try:
        report = _label(corpus, pairs)
    except _ERRORS as err:
        _fail(err)
    if strict and report.rejected:
        raise typer.Exit(1)


# ---- corpus: synth, info, verify ------------------------------------------------------------------
_SYNTH_OUT = typer.Argument(..., help="new corpus directory to write")
_SYNTH_VOLUMES = typer.Option(100, "--volumes", help="number of volumes (patients x eyes x visits)")
_SYNTH_GRID = typer.Option("16,64,64", "--grid", help="volume shape NB,D,W (B-scans, depth, A-scans)")
_SYNTH_SEED = typer.Option(0, "--seed", help="random seed: the same seed gives identical arrays")
_SYNTH_LABELLED = typer.Option(0.5, "--labelled", help="share of volumes (per split) with GA/RPD masks")
_SYNTH_PREVIEW = typer.Option(False, "--preview", help="also write OUT/preview.png")
_SYNTH_GROWTH = typer.Option(False, "--ga-growth", help="grow GA at known per-eye rates (OUT/ga_growth.csv)")
_INFO_CORPUS = typer.Argument(..., help="corpus directory, or a published corpus's URL (URL@SNAPSHOT_ID for an "
                               "icechunk snapshot)")
_INFO_JSON = typer.Option(False, "--json", help="print JSON instead of a table")
_VERIFY_PATH = typer.Argument(..., help="a corpus (a folder, or a published corpus's s3:// URL), or a shard "
                              "export (a folder or an s3:// prefix holding index.json)")


def _parse_grid(text: str) -> tuple[int, int, int]:
    from octssl.corpus.manifest import parse_grid

    try:
        return parse_grid(text)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


@app.command()
def synth(
    out: Path = _SYNTH_OUT,
    volumes: int = _SYNTH_VOLUMES,
    grid: str = _SYNTH_GRID,
    seed: int = _SYNTH_SEED,
    labelled: float = _SYNTH_LABELLED,
    preview: bool = _SYNTH_PREVIEW,
    ga_growth: bool = _SYNTH_GROWTH,
) -> None:
    """Write a synthetic corpus: OCT volumes with registered FAF/SLO and GA/RPD masks."""
    from octssl.corpus.synth import synthesize

    shape = _parse_grid(grid)
    try:
        corpus = synthesize(out, volumes=volumes, grid=shape, seed=seed, labelled=labelled, preview=preview,
                            progress=True, ga_growth=ga_growth)
    except _ERRORS as err:
        _fail(err)
    summary = corpus.summary()
    console.print(f"[green]wrote[/] {summary['volumes']} volumes of {grid} ({summary['patients']} patients, "
                  f"{summary['labels']['ga']} labelled) to {out}" + (f"; preview {out}/preview.png" if preview else ""))


@app.command()
def info(corpus: str = _INFO_CORPUS, as_json: bool = _INFO_JSON) -> None:
    """Counts per grid, split, modality and label; patients; raster scans; size on disk."""

    from octssl.corpus.store import Corpus

    try:
        opened = Corpus.open(corpus)
        from octssl.corpus.layout import labelled_per_split

        summary = {**opened.summary(), "key_fingerprint": opened.settings.get("key_fingerprint"),
                   "labelled_per_split": labelled_per_split(opened.rows),
                   "registration_flagged": {r["id"]: r["registration_problem"] for r in opened.rows
                                            if r.get("registration_problem")}}
    except _ERRORS as err:
        _fail(err)
    if as_json:
        print(json.dumps(summary, indent=2))
        return

    table = Table(title=f"corpus {corpus}", show_header=False)
    table.add_row("volumes", str(summary["volumes"]))
    table.add_row("patients / eyes", f"{summary['patients']} / {summary['eyes']}")
    for name in ("grids", "splits", "patients_per_split", "modalities", "labels", "labels_train_patients",
                 "devices"):
        table.add_row(name.replace("_", " "), ", ".join(f"{k}: {v}" for k, v in summary[name].items()) or "-")
    for label, counts in summary["labelled_per_split"].items():
        empty = [split for split, n in counts.items() if n == 0]
        table.add_row(f"labelled {label} per split", " / ".join(f"{split} {n}" for split, n in counts.items())
                      + (f" (none in {', '.join(empty)})"
                         if empty and any(counts.values()) else ""))
    reasons = ", ".join(f"{k}: {v}" for k, v in summary["non_raster"].items())
    table.add_row("raster / non-raster", f"{summary['raster']} / {summary['volumes'] - summary['raster']}"
                  + (f" ({reasons})" if reasons else ""))
    flagged = summary["registration_flagged"]
    if flagged:
        first_id, first = next(iter(flagged.items()))
        table.add_row("registration flagged", f"{len(flagged)} volume(s): no SLO stored, pretraining on SLO refused; "
                      f"e.g. {first_id}: {first}")
    upsampled = summary.get("upsampled") or {}
    if upsampled:
        table.add_row("upsampled", f"{sum(upsampled.values())} volumes on a grid finer than recorded ("
                      + ", ".join(f"{k}: {v}" for k, v in upsampled.items()) + ")")
    table.add_row("size on disk", f"{summary['bytes_on_disk'] / 2**20:.1f} MiB")
    table.add_row("pseudonym key", f"fingerprint {summary['key_fingerprint']}" if summary["key_fingerprint"]
                  else "none recorded (synthetic, or ingested before fingerprints)")
    if "snapshot_id" in summary:
        table.add_row("icechunk snapshot", summary["snapshot_id"])
    Console().print(table)


@app.command()
def verify(path: str = _VERIFY_PATH) -> None:
    """Recompute every checksum of a corpus (or shard directory); print every problem; exit 1 if any."""
    from octssl.corpus.icechunk import is_repository, split_snapshot
    from octssl.corpus.manifest import MANIFEST_NAME
    from octssl.storage.location import Location
    from octssl.webds.index import INDEX_NAME, is_shard_dir
    from octssl.webds.verify import verify_shards

    try:
        where = Location.parse(path)
        if not where.remote:
            shards = is_shard_dir(where)
        elif (where / INDEX_NAME).is_file():
            shards = True
        elif (where / MANIFEST_NAME).is_file() or split_snapshot(where)[1] or is_repository(where):
            shards = False  # a published corpus (an icechunk one: a repository, or URL@SNAPSHOT_ID)
        elif is_shard_dir(where):
            shards = True  # shard objects without their index: verify names what is missing
        else:
            raise StorageError(f"{where}: nothing to verify here: expected a shard export ({INDEX_NAME}), a "
                               f"published corpus ({MANIFEST_NAME}) or an icechunk repository at this URL "
                               "(or the bucket does not exist)")
    except _ERRORS as err:
        _fail(err)
    if shards:
        try:
            problems = verify_shards(path, progress=True)
        except _ERRORS as err:
            problems = [str(err)]
    else:
        from octssl.corpus.store import Corpus

        try:
            problems = Corpus.open(path).verify(progress=True)
        except _ERRORS as err:
            problems = [str(err)]
    for problem in problems:
        print(problem)
    if problems:
        console.print(f"[bold red]verify failed:[/] {len(problems)} problem(s)")
        raise typer.Exit(1)
    console.print(f"[green]ok[/] {path}")
