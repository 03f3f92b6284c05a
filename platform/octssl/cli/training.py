"""`octssl pretrain | finetune | plot | sweep | report | demo`: training runs, sweeps and the demo."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console

from octssl.cli import _ERRORS, _fail, _num, _usage, app, config_path, console
from octssl.errors import OctsslError

if TYPE_CHECKING:  # the sweep's modules load when a sweep command runs (`octssl --help` loads none)
    from octssl.tune.summary import SweepSummary


# ---------------------------------------------------------------- training
def _local_ray(dashboard: bool, worker_logs: bool) -> None:
    """Ask the local Ray this command starts for its dashboard and for the workers' output on stderr."""

    from octssl.cluster.local import DASHBOARD_ENV, WORKER_LOGS_ENV

    for env, wanted in ((DASHBOARD_ENV, dashboard), (WORKER_LOGS_ENV, worker_logs)):
        if wanted:
            os.environ[env] = "1"


def stray_arguments(extra: list[str], overrides: list[str]) -> str | None:
    """The line for words that belong to no option (None when there are none): most often a ``--set KEY
    VALUE`` typed with a space, which click would call "unexpected extra argument"."""
    if not extra:
        return None
    for item in overrides:
        if "=" not in item:
            return (f"--set {item} {extra[0]}: --set takes KEY=VALUE as one word; write "
                    f"--set {item}={extra[0]}")
    return f"unexpected argument(s) {' '.join(extra)!r}: options take --NAME VALUE; config keys go in --set KEY=VALUE"


#: Commands that take --set: extra words reach the command (see :func:`stray_arguments`), not click's error.
_EXTRA = {"allow_extra_args": True}


def _command_line(command: str, config: Path | None, old_config: Path | None, overrides: list[str],
                  extra: list[str]) -> Path:
    """The config of a command that takes one; a stray word is a usage error (exit 2), one line."""
    path, more = config_path(config, old_config, command)
    stray = stray_arguments([*more, *extra], overrides)
    if stray:
        _usage(stray)
    return path


def _resume_mode(resume: bool, resume_if_exists: bool) -> bool | str:
    """launch.run's `resume`: True (the run must exist), "auto" (continue it if it exists) or False."""
    if resume and resume_if_exists:
        _usage("give one of --resume and --resume-if-exists")
    return "auto" if resume_if_exists else resume


def _train(config: Path, overrides: list[str], resume: bool | str, metrics_port: int | None, kind: str,
           dry_run: bool = False) -> None:
    from octssl.config.job import load_config
    from octssl.train.launch import run

    try:
        job = load_config(config, overrides)
        if job.kind != kind:
            raise OctsslError(f"{config}: kind is '{job.kind}', not '{kind}': use `octssl {job.kind}`")
        if dry_run:
            from octssl.train.dryrun import job_plan, render

            _dry_run_verdict(render, job_plan(job, resume=resume), config)
        from octssl.train.dryrun import split_problem

        problem = split_problem(job)
        if problem:  # a run without labelled train or val volumes would train or choose on nothing
            raise OctsslError(problem)
        summary = run(job, resume=resume, metrics_port=metrics_port)
    except _ERRORS as err:
        _fail(err)
    console.print(
        f"[green]done[/] {summary.steps} steps, loss {_num(summary.first_loss)} -> {_num(summary.final_loss)}, "
        f"best {summary.best_metric_name} {_num(summary.best_metric)}"
        + (f" (threshold {summary.best_threshold})" if summary.best_threshold is not None else "")
        + f", weights {summary.weights}"
    )


def _dry_run_verdict(render: Callable[[dict, str], str], plan: dict, config: Path) -> NoReturn:
    """Print the plan; exit 1 when the real run could not start (the reasons are the plan's last lines)."""
    print(render(plan, str(config)))
    if plan["cannot_run"]:
        console.print(f"[bold red]dry run:[/] {config} cannot run: " + "; ".join(plan["cannot_run"]))
        raise typer.Exit(1)
    raise typer.Exit(0)


_CONFIG = typer.Argument(None, metavar="CONFIG", show_default=False, help="job YAML (see jobs/)")
_OLD_CONFIG = typer.Option(None, "--config", "-c", hidden=True, help="deprecated spelling of CONFIG")
_SET = typer.Option([], "--set", help="override a config key: --set optim.lr=0.01 (repeatable)")
_RESUME = typer.Option(False, "--resume", help="continue the run named by run.name from its last checkpoint")
_RESUME_IF_EXISTS = typer.Option(False, "--resume-if-exists",
                                 help="continue run.name if it exists, else start it (safe to rerun)")
_PORT = typer.Option(None, "--metrics-port", help="serve Prometheus /metrics on PORT+rank per worker "
                     "(octssl's port: 29100; off unless given)")
_DASHBOARD = typer.Option(False, "--dashboard", help="local Ray only: start Ray's dashboard on 127.0.0.1:8265")
_WORKER_LOGS = typer.Option(False, "--worker-logs", help="show the Ray workers' output on this terminal")
_DRY_RUN = typer.Option(False, "--dry-run", help="print the plan (steps, memory, wall time); train nothing")


@app.command(context_settings=_EXTRA)
def pretrain(
    ctx: typer.Context, config: Path | None = _CONFIG, set_: list[str] = _SET, resume: bool = _RESUME,
    resume_if_exists: bool = _RESUME_IF_EXISTS, metrics_port: int | None = _PORT, dashboard: bool = _DASHBOARD,
    worker_logs: bool = _WORKER_LOGS, dry_run: bool = _DRY_RUN, old_config: Path | None = _OLD_CONFIG,
) -> None:
    """Self-supervised pretraining (reconstruct FAF or SLO from OCT) under Ray Train + DeepSpeed."""
    path = _command_line("pretrain", config, old_config, set_, ctx.args)
    mode = _resume_mode(resume, resume_if_exists)
    _local_ray(dashboard, worker_logs)
    _train(path, set_, mode, metrics_port, "pretrain", dry_run)


@app.command(context_settings=_EXTRA)
def finetune(
    ctx: typer.Context, config: Path | None = _CONFIG, set_: list[str] = _SET, resume: bool = _RESUME,
    resume_if_exists: bool = _RESUME_IF_EXISTS, metrics_port: int | None = _PORT, dashboard: bool = _DASHBOARD,
    worker_logs: bool = _WORKER_LOGS, dry_run: bool = _DRY_RUN, old_config: Path | None = _OLD_CONFIG,
) -> None:
    """Fine-tune for GA/RPD segmentation at a label fraction, from scratch or pretrained weights."""
    path = _command_line("finetune", config, old_config, set_, ctx.args)
    mode = _resume_mode(resume, resume_if_exists)
    _local_ray(dashboard, worker_logs)
    _train(path, set_, mode, metrics_port, "finetune", dry_run)


_RUN_DIR = typer.Argument(..., help="a training run directory (metrics.jsonl, val.jsonl)")


@app.command()
def plot(run_dir: Path = _RUN_DIR) -> None:
    """Write a run's loss, validation and throughput curves to RUN_DIR/plots/*.png."""
    from octssl.observe.plots import plot_run

    try:
        paths = plot_run(run_dir)
    except _ERRORS as err:
        _fail(err)
    for path in paths:
        print(path)


# ---------------------------------------------------------------- sweep, report, demo
_SWEEP_CONFIG = typer.Argument(None, metavar="CONFIG", show_default=False,
                               help="sweep YAML (kind: sweep; see jobs/sweep.yaml)")
_SWEEP_SET = typer.Option([], "--set", help="override a sweep key: --set fractions=[0.1,1.0] (repeatable)")
_SWEEP_RESUME = typer.Option(False, "--resume", help="continue the sweep named by name: in its own directory "
                             "(finished trials are kept, unfinished ones continue from their last checkpoint)")
_REPORT_DIR = typer.Argument(..., help="a sweep directory or URL (summary.json, results.parquet, trials.parquet)")
_DEMO_OUT = typer.Option(Path("runs/demo"), "--out", "-o", help="demo directory (a previous demo there is replaced)")
_DEMO_QUICK = typer.Option(False, "--quick", help="smoke-sized demo (about a minute; numbers mean nothing)")


def _print_tables(summary: SweepSummary) -> None:
    from octssl.tune.report import rich_tables

    for table in rich_tables(summary):
        Console().print(table)


@app.command(context_settings=_EXTRA)
def sweep(ctx: typer.Context, config: Path | None = _SWEEP_CONFIG, set_: list[str] = _SWEEP_SET,
          resume: bool = _SWEEP_RESUME, dashboard: bool = _DASHBOARD, worker_logs: bool = _WORKER_LOGS,
          dry_run: bool = _DRY_RUN, old_config: Path | None = _OLD_CONFIG) -> None:
    """Fine-tune every task x label fraction x init x model with Ray Tune (ASHA), test the best, report."""
    from octssl.tune.sweep import load_sweep_config, run_sweep

    config = _command_line("sweep", config, old_config, set_, ctx.args)
    _local_ray(dashboard, worker_logs)
    try:
        if dry_run:
            from octssl.train.dryrun import render, sweep_plan

            _dry_run_verdict(render, sweep_plan(load_sweep_config(config, set_)), config)
        summary = run_sweep(load_sweep_config(config, set_), resume=resume)
    except _ERRORS as err:
        _fail(err)
    _print_tables(summary)
    counts = summary.trials
    console.print(f"[green]done[/] {summary.sweep_dir}/report.md ({sum(counts.values())} trials: "
                  + ", ".join(f"{n} {status}" for status, n in counts.items()) + ")")


@app.command()
def report(sweep_dir: str = _REPORT_DIR) -> None:
    """Rebuild report.md and the figures of a sweep directory (a folder or a URL) from its files; print the table."""

    from octssl.storage.location import Location
    from octssl.tune.report import build_report
    from octssl.tune.summary import read_sweep_summary

    try:
        path = build_report(sweep_dir)
        summary_file = Location.parse(sweep_dir) / "summary.json"
        summary = read_sweep_summary(summary_file.read_bytes(), str(summary_file))
    except _ERRORS as err:
        _fail(err)
    _print_tables(summary)
    console.print(f"[green]wrote[/] {path}")


_DEMO_LOOP = typer.Option(True, "--close-loop/--no-close-loop", help="GA grows at known rates; the sweep's GA bundle "
                          "then predicts the test split and GA growth is added to report.md (default: on)")


@app.command()
def demo(out: Path = _DEMO_OUT, quick: bool = _DEMO_QUICK, close_loop: bool = _DEMO_LOOP) -> None:
    """Synthesise a corpus, export shards, pretrain (2 workers), sweep GA/RPD fine-tuning, write the report."""
    from octssl.demo.run import run_demo

    try:
        run_demo(out, quick=quick, console=console, close_loop=close_loop)
    except _ERRORS as err:
        _fail(err)
