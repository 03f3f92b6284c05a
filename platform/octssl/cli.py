"""The `octssl` command line: thin typer commands that parse, load config and call the library."""

from __future__ import annotations

from pathlib import Path

import typer
import typer.core
from rich.console import Console

from octssl.errors import OctsslError

#: ``octssl --help`` lists commands in the order of the workflow (commands not named here come last)
WORKFLOW = ("synth", "ingest", "label", "info", "verify", "export-shards", "publish", "pretrain", "finetune",
            "sweep", "report", "export-model", "predict", "growth", "plot", "demo", "submit", "jobs")


class _WorkflowOrder(typer.core.TyperGroup):
    def list_commands(self, ctx: typer.core.click.Context) -> list[str]:  # type: ignore[name-defined]
        names = super().list_commands(ctx)
        rank = {name: i for i, name in enumerate(WORKFLOW)}
        return sorted(names, key=lambda name: (rank.get(name, len(WORKFLOW)), name))


app = typer.Typer(
    cls=_WorkflowOrder,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,  # click's help: typer's rich panels print flags as "--json <bool>"
    pretty_exceptions_enable=False,
    help="octssl: self-supervised 3D-to-2D OCT pretraining (Ray + DeepSpeed), fine-tuning sweeps and corpora.",
)
console = Console(stderr=True, soft_wrap=True)  # an error stays one line, whatever the width


#: What a command turns into one line naming the file and the problem (exit code 2), never a traceback.
_ERRORS = (OctsslError, OSError)


def _fail(err: Exception) -> None:
    from rich.markup import escape

    if isinstance(err, OSError) and err.filename is not None:
        text = f"{err.filename}: {err.strerror or err}"
    else:
        text = str(err)
    console.print(f"[bold red]error:[/] {escape(text)}", soft_wrap=True)  # one line, brackets kept as typed
    raise typer.Exit(2)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"octssl {version('octssl')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit"),
) -> None:
    """octssl: self-supervised 3D-to-2D OCT pretraining (Ray + DeepSpeed), fine-tuning sweeps and corpora."""


def main() -> None:
    """The `octssl` console script: library errors and file-system errors end in one line, not a traceback."""
    try:
        app()
    except OSError as err:  # e.g. --out naming an existing file, a folder under a file, a full disk
        where = f"{err.filename}: " if err.filename else ""
        console.print(f"[bold red]error:[/] {where}{err.strerror or err}")
        raise SystemExit(2) from None
    except OctsslError as err:
        console.print(f"[bold red]error:[/] {err}")
        raise SystemExit(2) from None


# Commands are added below, one block per area; each imports its library lazily so that
# `octssl --help` stays fast.


# ---------------------------------------------------------------- training
def _local_ray(dashboard: bool, worker_logs: bool) -> None:
    """Ask the local Ray this command starts for its dashboard and for the workers' output on stderr."""
    import os

    from octssl.cluster import DASHBOARD_ENV, WORKER_LOGS_ENV

    for env, wanted in ((DASHBOARD_ENV, dashboard), (WORKER_LOGS_ENV, worker_logs)):
        if wanted:
            os.environ[env] = "1"


def _train(config: Path, overrides: list[str], resume: bool, metrics_port: int | None, kind: str,
           dry_run: bool = False) -> None:
    from octssl.config import load_config
    from octssl.train.launch import run

    try:
        job = load_config(config, overrides)
        if job.kind != kind:
            raise OctsslError(f"{config}: kind is '{job.kind}', not '{kind}': use `octssl {job.kind}`")
        if dry_run:
            from octssl.dryrun import job_plan, render

            print(render(job_plan(job), str(config)))
            return
        summary = run(job, resume=resume, metrics_port=metrics_port)
    except _ERRORS as err:
        _fail(err)
    console.print(
        f"[green]done[/] {summary['steps']} steps, loss {_num(summary['first_loss'])} -> {_num(summary['final_loss'])}, "
        f"best {summary['best_metric_name']} {_num(summary['best_metric'])}, weights {summary['weights']}"
    )


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


_CONFIG = typer.Option(..., "--config", "-c", help="job YAML (see jobs/)")
_SET = typer.Option([], "--set", help="override a config key: --set optim.lr=0.01 (repeatable)")
_RESUME = typer.Option(False, "--resume", help="continue the run named by run.name from its last checkpoint")
_PORT = typer.Option(None, "--metrics-port", help="serve Prometheus /metrics on PORT+rank per worker")
_DASHBOARD = typer.Option(False, "--dashboard", help="local Ray only: start Ray's dashboard on 127.0.0.1:8265")
_WORKER_LOGS = typer.Option(False, "--worker-logs", help="show the Ray workers' output on this terminal")
_DRY_RUN = typer.Option(False, "--dry-run", help="print the plan (steps, memory, wall time); train nothing")


@app.command()
def pretrain(
    config: Path = _CONFIG, set_: list[str] = _SET, resume: bool = _RESUME, metrics_port: int | None = _PORT,
    dashboard: bool = _DASHBOARD, worker_logs: bool = _WORKER_LOGS, dry_run: bool = _DRY_RUN,
) -> None:
    """Self-supervised pretraining (reconstruct FAF or SLO from OCT) under Ray Train + DeepSpeed."""
    _local_ray(dashboard, worker_logs)
    _train(config, set_, resume, metrics_port, "pretrain", dry_run)


@app.command()
def finetune(
    config: Path = _CONFIG, set_: list[str] = _SET, resume: bool = _RESUME, metrics_port: int | None = _PORT,
    dashboard: bool = _DASHBOARD, worker_logs: bool = _WORKER_LOGS, dry_run: bool = _DRY_RUN,
) -> None:
    """Fine-tune for GA/RPD segmentation at a label fraction, from scratch or pretrained weights."""
    _local_ray(dashboard, worker_logs)
    _train(config, set_, resume, metrics_port, "finetune", dry_run)


_RUN_DIR = typer.Argument(..., help="a training run directory (metrics.jsonl, val.jsonl)")


@app.command()
def plot(run_dir: Path = _RUN_DIR) -> None:
    """Write a run's loss, validation and throughput curves to RUN_DIR/plots/*.png."""
    from octssl.plots import plot_run

    try:
        paths = plot_run(run_dir)
    except _ERRORS as err:
        _fail(err)
    for path in paths:
        print(path)


# ---------------------------------------------------------------- Ray jobs (submit, status, logs, stop)
jobs_app = typer.Typer(no_args_is_help=True, help="Follow jobs on a Ray cluster: status, logs, stop.")
app.add_typer(jobs_app, name="jobs")

_ADDRESS = typer.Option(
    "http://127.0.0.1:8265", "--address", "-a", envvar="RAY_API_SERVER_ADDRESS",
    help="Ray dashboard URL of the cluster head (env RAY_API_SERVER_ADDRESS)",
)


_SUBMIT_CONFIG = typer.Argument(..., help="job YAML inside this checkout (see jobs/)")
_SUBMIT_SET = typer.Option([], "--set", help="override a config key on the cluster (repeatable)")
_SUBMIT_PORT = typer.Option(None, "--metrics-port", help="workers serve Prometheus /metrics on PORT+rank")
_SUBMIT_WAIT = typer.Option(False, "--wait", help="stream the job's logs until it ends; exit 1 unless SUCCEEDED")
_SUBMIT_TIMEOUT = typer.Option(None, "--timeout", help="with --wait: give up after SECONDS")


@app.command()
def submit(
    config: Path = _SUBMIT_CONFIG,
    address: str = _ADDRESS,
    set_: list[str] = _SUBMIT_SET,
    metrics_port: int | None = _SUBMIT_PORT,
    wait: bool = _SUBMIT_WAIT,
    timeout: float | None = _SUBMIT_TIMEOUT,
) -> None:
    """Submit `python -m octssl.jobs CONFIG` to a Ray cluster, uploading this checkout as the working dir."""
    from octssl import jobs_client

    extra = ["--metrics-port", str(metrics_port)] if metrics_port is not None else []
    try:
        job_id = jobs_client.submit(config, address, overrides=set_, extra_args=extra)
        print(job_id)
        if not wait:
            console.print(f"submitted; follow with `octssl jobs logs {job_id} --address {address}`")
            return
        state = _stream_until_done(job_id, address, timeout)
    except _ERRORS as err:
        _fail(err)
    console.print(f"job {job_id}: {state}")
    if state != "SUCCEEDED":
        raise typer.Exit(1)


def _stream_until_done(job_id: str, address: str, timeout: float | None) -> str:
    """Print the job's logs as they come (stdout) until it ends or `timeout` passes; its final state."""
    import threading

    from octssl import jobs_client

    def stream() -> None:
        for chunk in jobs_client.follow(job_id, address):
            print(chunk, end="", flush=True)

    reader = threading.Thread(target=stream, daemon=True)  # ends with the job's log, or with this process
    reader.start()
    state = jobs_client.wait(job_id, address, timeout_s=timeout)  # errors (token, address) surface here
    reader.join(timeout=30)
    return state


@jobs_app.command("status")
def jobs_status(job_id: str, address: str = _ADDRESS) -> None:
    """Print a job's state (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) and the cluster's message."""
    from octssl import jobs_client

    try:
        details = jobs_client.info(job_id, address)
    except _ERRORS as err:
        _fail(err)
    print(details["status"])
    if details["message"]:
        console.print(details["message"])


_FOLLOW = typer.Option(False, "--follow", "-f", help="keep printing new output until the job ends")


@jobs_app.command("logs")
def jobs_logs(job_id: str, address: str = _ADDRESS, follow: bool = _FOLLOW) -> None:
    """Print everything the job's driver has written so far (with --follow: and what it writes next)."""
    from octssl import jobs_client

    try:
        if follow:
            for chunk in jobs_client.follow(job_id, address):
                print(chunk, end="", flush=True)
            return
        text = jobs_client.logs(job_id, address)
    except _ERRORS as err:
        _fail(err)
    print(text, end="")


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: str = _ADDRESS) -> None:
    """Ask the cluster to stop a job."""
    from octssl import jobs_client

    try:
        stopped = jobs_client.stop(job_id, address)
    except _ERRORS as err:
        _fail(err)
    console.print(f"job {job_id}: " + ("stop requested" if stopped else "already finished"))


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
_PUBLISH_URL = typer.Argument(..., help="destination s3://BUCKET/PREFIX (endpoint and keys from AWS_* variables)")


@app.command()
def publish(corpus: Path = _PUBLISH_CORPUS, url: str = _PUBLISH_URL) -> None:
    """Upload a corpus to object storage: data, then a read-back check, then the manifest (resumable)."""
    from octssl.corpus.publish import publish as publish_corpus

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
_INGEST_DEPTH = typer.Option(1.0, "--depth-mm", help="depth window kept around the retina before resizing to D")
_INGEST_BATCH = typer.Option(16, "--batch-size", help="volumes per atomic corpus append")
_INGEST_PAIRS = typer.Option(None, "--pairs", help="pairs table (CSV) of en-face images/masks to attach after ingest")
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
) -> None:
    """Ingest device exports into a corpus: PHI replaced by keyed pseudonyms, bad files to rejects.parquet."""
    import os

    from octssl.ingest import pipeline
    from octssl.ingest.phi import EPHEMERAL_WARNING, KEY_ENV

    def rejected(path: str, reason: str) -> None:
        console.print(f"[yellow]rejected[/] {path}: {reason}")

    try:
        shape = pipeline.parse_grid(grid)
        maps = pipeline.parse_maps(map_)
        if ephemeral_key and not os.environ.get(KEY_ENV):
            console.print(f"[bold red]WARNING:[/] {EPHEMERAL_WARNING}")
        report = pipeline.ingest(sources, out, grid=shape, workers=workers, ephemeral_key=ephemeral_key,
                                 batch_size=batch_size, depth_mm=depth_mm, on_reject=rejected, maps=maps)
    except _ERRORS as err:
        _fail(err)
    mb = report.bytes_read / 2**20
    console.print(
        f"[green]ingested[/] {len(report.ingested)} volumes from {report.units} files/stacks into {out} "
        f"({mb:.1f} MiB in {report.seconds:.1f} s, {report.executor}); skipped {len(report.skipped)} already "
        f"ingested; rejected {len(report.rejected)}" + (f" (see {out}/rejects.parquet)" if report.rejected else "")
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
_INFO_CORPUS = typer.Argument(..., help="corpus directory")
_INFO_JSON = typer.Option(False, "--json", help="print JSON instead of a table")
_VERIFY_PATH = typer.Argument(..., help="corpus directory, or a shard folder / s3://BUCKET/PREFIX holding index.json")


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
def info(corpus: Path = _INFO_CORPUS, as_json: bool = _INFO_JSON) -> None:
    """Counts per grid, split, modality and label; patients; raster scans; size on disk."""
    import json

    from octssl.corpus.store import Corpus

    try:
        summary = Corpus.open(corpus).summary()
    except _ERRORS as err:
        _fail(err)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"corpus {corpus}", show_header=False)
    table.add_row("volumes", str(summary["volumes"]))
    table.add_row("patients / eyes", f"{summary['patients']} / {summary['eyes']}")
    for name in ("grids", "splits", "patients_per_split", "modalities", "labels", "labels_train_patients",
                 "devices"):
        table.add_row(name.replace("_", " "), ", ".join(f"{k}: {v}" for k, v in summary[name].items()) or "-")
    reasons = ", ".join(f"{k}: {v}" for k, v in summary["non_raster"].items())
    table.add_row("raster / non-raster", f"{summary['raster']} / {summary['volumes'] - summary['raster']}"
                  + (f" ({reasons})" if reasons else ""))
    table.add_row("size on disk", f"{summary['bytes_on_disk'] / 2**20:.1f} MiB")
    Console().print(table)


@app.command()
def verify(path: str = _VERIFY_PATH) -> None:
    """Recompute every checksum of a corpus (or shard directory); print every problem; exit 1 if any."""
    from octssl.storage import Location
    from octssl.webds.index import is_shard_dir
    from octssl.webds.verify import verify_shards

    try:
        shards = is_shard_dir(path)
    except _ERRORS as err:
        _fail(err)
    if shards or Location.parse(path).remote:
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


# ---------------------------------------------------------------- sweep, report, demo
_SWEEP_CONFIG = typer.Option(..., "--config", "-c", help="sweep YAML (kind: sweep; see jobs/sweep.yaml)")
_SWEEP_SET = typer.Option([], "--set", help="override a sweep key: --set fractions=[0.1,1.0] (repeatable)")
_REPORT_DIR = typer.Argument(..., help="a sweep directory (summary.json, results.parquet, trials.parquet)")
_DEMO_OUT = typer.Option(Path("runs/demo"), "--out", "-o", help="demo directory (a previous demo there is replaced)")
_DEMO_QUICK = typer.Option(False, "--quick", help="smoke-sized demo (about a minute; numbers mean nothing)")


def _print_tables(summary: dict) -> None:
    from octssl.report import rich_tables

    for table in rich_tables(summary):
        Console().print(table)


@app.command()
def sweep(config: Path = _SWEEP_CONFIG, set_: list[str] = _SWEEP_SET, dashboard: bool = _DASHBOARD,
          worker_logs: bool = _WORKER_LOGS, dry_run: bool = _DRY_RUN) -> None:
    """Fine-tune every task x label fraction x init x model with Ray Tune (ASHA), test the best, report."""
    from octssl.tune.sweep import load_sweep_config, run_sweep

    _local_ray(dashboard, worker_logs)
    try:
        if dry_run:
            from octssl.dryrun import render, sweep_plan

            print(render(sweep_plan(load_sweep_config(config, set_)), str(config)))
            return
        summary = run_sweep(load_sweep_config(config, set_))
    except _ERRORS as err:
        _fail(err)
    _print_tables(summary)
    counts = summary["trials"]
    console.print(f"[green]done[/] {summary['sweep_dir']}/report.md ({sum(counts.values())} trials: "
                  + ", ".join(f"{n} {status}" for status, n in counts.items()) + ")")


@app.command()
def report(sweep_dir: Path = _REPORT_DIR) -> None:
    """Rebuild report.md and the figures of a sweep directory from its files; print the table."""
    import json

    from octssl.report import build_report

    try:
        path = build_report(sweep_dir)
    except _ERRORS as err:
        _fail(err)
    _print_tables(json.loads((sweep_dir / "summary.json").read_text()))
    console.print(f"[green]wrote[/] {path}")


_DEMO_LOOP = typer.Option(False, "--close-loop", help="GA grows at known rates; the sweep's GA bundle then predicts "
                          "the test split and GA growth is added to report.md")


@app.command()
def demo(out: Path = _DEMO_OUT, quick: bool = _DEMO_QUICK, close_loop: bool = _DEMO_LOOP) -> None:
    """Synthesise a corpus, export shards, pretrain (2 workers), sweep GA/RPD fine-tuning, write the report."""
    from octssl.demo import run_demo

    try:
        run_demo(out, quick=quick, console=console, close_loop=close_loop)
    except _ERRORS as err:
        _fail(err)



# ---------------------------------------------------------------- bundles, predict, growth
_EXPORT_SOURCE = typer.Argument(..., help="a fine-tuning run directory, or a sweep directory (its best cell)")
_EXPORT_TASK = typer.Option(..., "--task", help="ga or rpd")
_EXPORT_BUNDLE = typer.Option(..., "--out", "-o", help="bundle directory to write (model.safetensors + config.json)")
_EXPORT_REPLACE = typer.Option(False, "--overwrite", help="replace a bundle already at --out")
_PREDICT_BUNDLE = typer.Argument(..., help="model bundle directory (octssl export-model)")
_PREDICT_SRC = typer.Argument(..., help="one corpus directory, or device files and folders")
_PREDICT_OUT = typer.Option(..., "--out", "-o", help="output directory (PNGs per volume, predictions.parquet/.csv)")
_PREDICT_SPLIT = typer.Option(None, "--split", help="corpus only: predict train, val or test volumes")
_PREDICT_IDS = typer.Option([], "--ids", help="corpus only: these volume ids (repeatable)")
_PREDICT_BATCH = typer.Option(4, "--batch-size", help="volumes per forward pass")
_GROWTH_SOURCE = typer.Argument(..., help="predictions.parquet/.csv (or a predict output folder), or a corpus")
_GROWTH_OUT = typer.Option(..., "--out", "-o", help="output directory (growth.csv, plots/, summary.json)")


@app.command("export-model")
def export_model_command(source: Path = _EXPORT_SOURCE, task: str = _EXPORT_TASK, out: Path = _EXPORT_BUNDLE,
                         overwrite: bool = _EXPORT_REPLACE) -> None:
    """Write a model bundle for TASK: weights, threshold chosen on the val split, metrics and provenance."""
    import json

    from octssl.models.bundle import export_model

    try:
        path = export_model(source, task, out, overwrite=overwrite)
    except _ERRORS as err:
        _fail(err)
    config = json.loads((path / "config.json").read_text())
    console.print(f"[green]wrote[/] {path}: {config['model']['name']} for {task}, threshold {config['threshold']}, "
                  f"val Dice {_num(config['metrics']['val']['dice'])}")


@app.command()
def predict(bundle: Path = _PREDICT_BUNDLE, sources: list[Path] = _PREDICT_SRC, out: Path = _PREDICT_OUT,
            split: str | None = _PREDICT_SPLIT, ids: list[str] = _PREDICT_IDS, batch_size: int = _PREDICT_BATCH,
            ephemeral_key: bool = _INGEST_EPHEMERAL) -> None:
    """Segment GA/RPD with a bundle on a corpus or device files: PNGs per volume, area, lesions, Dice/HD95."""
    from octssl.predict import predict as run_predict

    try:
        report = run_predict(bundle, sources, out, split=split, ids=ids or None, batch_size=batch_size,
                             ephemeral_key=ephemeral_key)
    except _ERRORS as err:
        _fail(err)
    for path, reason in report.rejected:
        console.print(f"[yellow]rejected[/] {path}: {reason}")
    rate = len(report.rows) / report.seconds if report.seconds else 0.0
    console.print(f"[green]predicted[/] {len(report.rows)} volumes in {report.seconds:.1f} s ({rate:.2f} volumes/s, "
                  f"{report.executor}); {out}/predictions.csv" + (f"; rejected {len(report.rejected)} file(s)"
                                                                  if report.rejected else ""))


@app.command()
def growth(source: Path = _GROWTH_SOURCE, out: Path = _GROWTH_OUT) -> None:
    """GA growth per patient and eye (mm^2/year and sqrt mm/year, least squares) with one plot per eye."""
    from octssl.growth import growth_report

    try:
        summary = growth_report(source, out)
    except _ERRORS as err:
        _fail(err)
    console.print(f"[green]growth[/] {summary['eyes_fitted']} eyes fitted, {summary['eyes_insufficient']} with fewer "
                  f"than 2 dated visits (see {out}/insufficient.csv); mean rate "
                  f"{_num(summary['rate_mm2_per_year_mean'])} mm^2/year; {out}/growth.csv")
