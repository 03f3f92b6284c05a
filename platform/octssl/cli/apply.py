"""`octssl export-model | predict | growth`: model bundles, predictions and GA growth."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from octssl.cli import _ERRORS, _fail, _num, app, console
from octssl.cli.corpus import _INGEST_EPHEMERAL
from octssl.errors import ModelError, PredictError
from octssl.ingest.phi import KEY_ENV, missing_key

# ---------------------------------------------------------------- bundles, predict, growth
_EXPORT_SOURCE = typer.Argument(..., help="a fine-tuning run directory, or a sweep directory (its best cell); "
                                "a folder or an s3:// URL")
_EXPORT_TASK = typer.Option(..., "--task", help="ga or rpd")
_EXPORT_BUNDLE = typer.Option(..., "--out", "-o", help="bundle directory to write (model.safetensors + "
                               "config.json): a folder or an s3:// URL")
_EXPORT_REPLACE = typer.Option(False, "--overwrite", help="replace a bundle already at --out")
_PREDICT_BUNDLE = typer.Argument(..., help="model bundle directory or URL (octssl export-model)")
_PREDICT_SRC = typer.Argument(..., help="one corpus (a folder or a published corpus's URL), or device files and "
                              "folders")
_PREDICT_OUT = typer.Option(..., "--out", "-o", help="output directory (PNGs per volume, predictions.parquet/.csv)")
_PREDICT_SPLIT = typer.Option(None, "--split", help="corpus only: predict train, val or test volumes")
_PREDICT_IDS = typer.Option([], "--ids", help="corpus only: these volume ids (repeatable)")
_PREDICT_BATCH = typer.Option(4, "--batch-size", help="volumes per forward pass")
_PREDICT_REPLACE = typer.Option(False, "--overwrite", help="replace a previous prediction run at --out")
_PREDICT_RUNTIME = typer.Option("torch", "--runtime", help="torch (training precision policy), or the bundle's "
                                "torchscript or onnx export (onnxruntime, CPU)")
_PREDICT_FORMAT = typer.Option(["png", "nifti"], "--format", help="outputs per volume, repeatable or comma-separated: "
                               "png, nifti, dicom-seg (DICOM inputs; carries the source's patient/study ids)")
_GROWTH_SOURCE = typer.Argument(..., help="predictions.parquet/.csv (or a predict output folder), or a corpus")
_GROWTH_OUT = typer.Option(..., "--out", "-o", help="output directory (growth.csv, plots/, summary.json)")


@app.command("export-model")
def export_model_command(source: str = _EXPORT_SOURCE, task: str = _EXPORT_TASK, out: str = _EXPORT_BUNDLE,
                         overwrite: bool = _EXPORT_REPLACE) -> None:
    """Write a model bundle for TASK: weights, the threshold chosen on the val split with them, metrics, provenance."""
    from octssl.apply.bundle import CONFIG_NAME, BundleConfig, export_model
    from octssl.storage.location import Location
    from octssl.tune.bundles import export_sweep, is_sweep_dir

    try:
        export = export_sweep if is_sweep_dir(source) else export_model
        if export is export_model:
            _val_has_labels(source, task)
        path = export(source, task, out, overwrite=overwrite)
        config = BundleConfig.model_validate_json((Location.parse(path) / CONFIG_NAME).read_bytes())
    except _ERRORS as err:
        _fail(err)
    val = config.metrics.val
    console.print(f"[green]wrote[/] {path}: {config.model.name} for {task}, threshold {config.threshold}, "
                  f"val pooled Dice {_num(val.dice_pooled if val else None)}")


def _val_has_labels(source: str, task: str) -> None:
    """A bundle's threshold is chosen on the run's val split: refuse a fine-tuning run (a local folder with its
    config.yaml) whose corpus has no val volume labelled ``task`` rather than claim a choice made on nothing."""
    from octssl.config.job import load_config
    from octssl.corpus.layout import split_shortfall
    from octssl.corpus.store import Corpus

    saved = Path(source) / "config.yaml"
    if "://" in source or not saved.is_file():
        return  # a sweep directory or a URL: the bundle's own check applies
    job = load_config(saved)
    if job.objective.kind != "segmentation" or job.objective.target != task or not job.data.corpus:
        return  # export_model names the mismatch
    if "://" not in job.data.corpus and not Path(job.data.corpus).exists():
        return  # export needs no corpus: the weights' card says whether val chose a threshold
    problem = split_shortfall(Corpus.open(job.data.corpus).rows, task, job.data.corpus, needs=("val",))
    if problem:
        raise ModelError(f"{source}: no bundle: its threshold would be chosen on the val split, and {problem}")


@app.command()
def predict(bundle: str = _PREDICT_BUNDLE, sources: list[str] = _PREDICT_SRC, out: str = _PREDICT_OUT,
            split: str | None = _PREDICT_SPLIT, ids: list[str] = _PREDICT_IDS, batch_size: int = _PREDICT_BATCH,
            ephemeral_key: bool = _INGEST_EPHEMERAL, overwrite: bool = _PREDICT_REPLACE,
            runtime: str = _PREDICT_RUNTIME, formats: list[str] = _PREDICT_FORMAT) -> None:
    """Segment GA/RPD with a bundle on a corpus or device files: PNG/NIfTI/DICOM-SEG per volume, area, lesions,
    Dice/HD95. Exits 1 when nothing was predicted (every input rejected, or an empty selection)."""
    from octssl.apply.predict import predict as run_predict

    try:
        _key_for_files(sources, ephemeral_key)
        report = run_predict(bundle, sources, out, split=split, ids=ids or None, batch_size=batch_size,
                             ephemeral_key=ephemeral_key, overwrite=overwrite, runtime=runtime, formats=formats)
    except _ERRORS as err:
        _fail(err)
    for path, reason in report.rejected:
        console.print(f"[yellow]rejected[/] {path}: {reason}")
    rate = len(report.rows) / report.seconds if report.seconds else 0.0
    console.print(f"[green]predicted[/] {len(report.rows)} volumes in {report.seconds:.1f} s ({rate:.2f} volumes/s, "
                  f"{report.executor}); {out}/predictions.csv" + (f"; rejected {len(report.rejected)} file(s)"
                                                                  if report.rejected else ""))
    if not report.rows:
        console.print(f"[bold red]error:[/] predicted nothing; {len(report.rejected)} input(s) rejected "
                      f"(see {out}/rejects.parquet)")
        raise typer.Exit(1)


def _key_for_files(sources: list[str], ephemeral: bool) -> None:
    """Device files are pseudonymised as ingest does: without a key, refuse in predict's words."""

    from octssl.corpus.icechunk import is_repository, split_snapshot
    from octssl.corpus.layout import ZARR_NAME
    from octssl.storage.location import Location

    place = Location.parse(sources[0]) if len(sources) == 1 else None
    one_corpus = place is not None and (place.remote or (place.local / ZARR_NAME).is_dir()
                                        or split_snapshot(place)[1] is not None or is_repository(place))
    if not (one_corpus or ephemeral or os.environ.get(KEY_ENV)):
        raise PredictError(missing_key("predict on device files"))


@app.command()
def growth(source: Path = _GROWTH_SOURCE, out: Path = _GROWTH_OUT) -> None:
    """GA growth per patient and eye (mm^2/year and sqrt mm/year, least squares) with one plot per eye."""
    from octssl.apply.growth import growth_report

    try:
        summary = growth_report(source, out)
    except _ERRORS as err:
        _fail(err)
    console.print(f"[green]growth[/] {summary['eyes_fitted']} eyes fitted, {summary['eyes_insufficient']} with fewer "
                  f"than 2 dated visits (see {out}/insufficient.csv); {summary['eyes_excluded']} eye(s) excluded "
                  f"from the means ({_why(summary['eyes_excluded_why'])}); over {summary['eyes_included']} eyes with "
                  f"GA at baseline: mean rate {_num(summary['rate_mm2_per_year_mean'])} mm^2/year "
                  f"{_ci(summary['rate_mm2_per_year_ci95'])}, mean sqrt rate "
                  f"{_num(summary['rate_sqrt_mm_per_year_mean'])} mm/year {_ci(summary['rate_sqrt_mm_per_year_ci95'])}"
                  + (f"; {summary['points_left_out']} impossible area(s) left out (see {out}/areas.csv)"
                     if summary["points_left_out"] else "") + f"; {out}/growth.csv")


def _why(counts: dict[str, int]) -> str:
    return "; ".join(f"{n}: {reason}" for reason, n in counts.items()) or "none"


def _ci(bounds: list[float | None]) -> str:
    """``(95% CI a to b)``, or a plain word where too few eyes give no interval."""
    low, high = bounds
    return "(95% CI n/a)" if low is None or high is None else f"(95% CI {low:.4f} to {high:.4f})"
