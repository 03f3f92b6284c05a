"""`octssl sweep` orchestration: fine-tune every task x label fraction x init x model with a Ray Tune search, pick each
cell's best trial on the val split, evaluate it on the test split and write the label-efficiency report.

Stages, each timed in summary.json: ``preflight`` (everything checkable before a trial starts: corpus,
labels per task and split, weights files and their fit to each model, the trial jobs themselves),
``search`` (one Tune experiment, see :mod:`octssl.tune.search`), ``test`` (Ray tasks evaluating the
chosen weights per test volume), ``figures`` and ``report``. A failed trial is recorded with its error
and the sweep goes on; a group whose trials all failed is reported as failed. The results (trial rows,
the choice per group, the summary) are :mod:`octssl.tune.results`; the test split is :mod:`octssl.tune.testsplit`.

Outputs in ``SWEEP_DIR = storage_path/name``: ``sweep.yaml`` (resolved config), ``trials.parquet``
(one row per trial), ``results.parquet`` (one row per test volume, cell and seed), ``summary.json``,
``figures/*.npz`` (the arrays behind the figures), ``report.md`` and its PNGs; ``trials/<trial>/`` are
the trials' run directories and ``tune/`` is Ray Tune's experiment state. With ``storage_path`` on an
object store, Tune keeps its state there and the rest is written to a local staging folder, uploaded to
SWEEP_DIR when the sweep ends (:func:`octssl.tune.results.staged_sweep_dir`).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from octssl.cluster.local import require
from octssl.config.sweep import SCRATCH, Cell, Group, SweepConfig, load_sweep_config, trial_job
from octssl.corpus.store import Corpus
from octssl.data.version import corpus_version
from octssl.errors import ConfigError, CorpusError, OctsslError
from octssl.observe.metrics import serve
from octssl.observe.tracking import TrackedRun, finish_sweep_run, open_sweep_run, trial_callback
from octssl.storage.location import Location, absolute, ray_storage, staging_dir, upload_tree
from octssl.tune.bundles import write_sweep_bundles
from octssl.tune.report import build_report
from octssl.tune.results import (
    RESULT_COLUMNS,
    choose,
    published,
    staged_sweep_dir,
    summarise,
    trial_row,
    write_parquet,
)
from octssl.tune.summary import SweepSummary, read_sweep_summary
from octssl.tune.testsplit import evaluate_chosen, figure_data

__all__ = ["load_sweep_config", "preflight_sweep", "run_sweep", "sweep_dir_of"]


def sweep_dir_of(config: SweepConfig, resume: bool | str = False) -> tuple[SweepConfig, Location, bool]:
    """The config with absolute paths (trials run with another working directory; URLs stay URLs), its
    SWEEP_DIR (a folder or an object-store prefix) and whether the sweep continues there.

    ``resume``: False, SWEEP_DIR must not exist; True, it must, with the same config; "auto" (a retried
    RayJob), continue it when it exists, else start it. A sweep resumed with another config is refused:
    its finished trials would be mixed with trials of a different experiment."""
    config = config.model_copy(deep=True)
    if resume and config.name is None:
        raise ConfigError("resuming a sweep needs its name: set name: in the config (or --set name=NAME)")
    config.name = config.name or f"sweep-{datetime.now():%Y%m%d-%H%M%S}"
    config.storage_path = absolute(config.storage_path)
    config.corpus = absolute(config.corpus)
    config.inits = {k: v if v == SCRATCH else absolute(v) for k, v in config.inits.items()}
    sweep_dir = Location.parse(config.storage_path) / config.name
    exists = sweep_dir.exists()
    if resume == "auto":
        resume = exists
    if not resume and exists:
        raise ConfigError(f"{sweep_dir} already exists: pass --resume to continue it, or choose another name")
    if resume and not exists:
        raise ConfigError(f"{sweep_dir}: no such sweep to resume")
    if resume:
        _check_same_config(config, sweep_dir)
    return config, sweep_dir, bool(resume)


#: keys that may change between a sweep and its resume (they do not change any trial)
_RESUMABLE_CHANGES = ("metrics_port",)


def _check_same_config(config: SweepConfig, place: Location) -> None:
    """Refuse to resume SWEEP_DIR with a config other than the one it started with (its ``sweep.yaml``: in
    SWEEP_DIR, or for a sweep on an object store in the local staging folder it writes until it ends)."""
    saved = [place / "sweep.yaml"] + ([Location.parse(staging_dir(place)) / "sweep.yaml"] if place.remote else [])
    found = next((path for path in saved if path.is_file()), None)
    if found is None:
        raise ConfigError(f"{place}: no sweep.yaml (looked in {', '.join(map(str, saved))}): not a sweep this "
                          "platform can resume; choose another name")
    before = yaml.safe_load(found.read_bytes()) or {}
    now = config.model_dump(mode="json")
    changed = sorted(k for k in set(before) | set(now) if k not in _RESUMABLE_CHANGES and before.get(k) != now.get(k))
    if changed:
        raise ConfigError(f"{found}: the sweep {config.name!r} exists with another config (changed: "
                          f"{', '.join(changed)}): resume it with its own config, or choose another name")


def _finished(place: Location) -> SweepSummary | None:
    """summary.json of a sweep that already ended (a retried RayJob after its last step), else None."""
    done = place / "summary.json"
    return read_sweep_summary(done.read_bytes(), str(done)) if done.is_file() else None


def preflight_sweep(config: SweepConfig) -> dict[str, Any]:
    """Fail with the reason before any trial starts; returns per-cell facts (labelled patients, volumes)."""
    from octssl.train.launch import preflight
    from octssl.tune.evaluate import figure_ids

    corpus = Corpus.open(config.corpus)
    for name, path in config.inits.items():
        if path != SCRATCH and not Location.parse(path).is_file():
            raise ConfigError(f"inits.{name}: {path}: no such weights file (pretrain first, or fix the path)")
    facts: dict[str, Any] = {"val": {}, "test": {}, "figure": {}, "cells": {},
                             "corpus_version": corpus_version(config.corpus)}
    for task in config.tasks:
        try:
            corpus.label_fraction_patients(task, 1.0)
        except CorpusError:
            raise ConfigError(f"{config.corpus}: no train volumes labelled '{task}': cannot fine-tune task "
                              f"{task} (remove it from tasks)") from None
        for split in ("val", "test"):
            ids = corpus.ids(split=split, label=task)
            if not ids:
                use = "compare trials" if split == "val" else "measure the chosen trials"
                raise ConfigError(f"{config.corpus}: no {split} volumes labelled '{task}': cannot {use}")
            facts[split][task] = ids[: config.test_volumes] if split == "test" and config.test_volumes else ids
        facts["figure"][task] = figure_ids(config.corpus, task, facts["test"][task], config.figure_volumes)
        for fraction in config.fractions_of(task):
            facts["cells"][(task, fraction)] = {
                "n_train_patients": len(corpus.label_fraction_patients(task, fraction)),
                "n_train_volumes": len(corpus.ids(split="train", label=task, label_fraction=fraction)),
            }
    first = config.search.points[0].model_dump() if config.search.points else {
        "lr": config.search.lr[0], "weight_decay": config.search.weight_decay[0], "steps": config.search.steps[0]}
    for task in config.tasks:
        for init in config.inits:
            for model in config.models:
                group = Group(Cell(task, config.fractions_of(task)[0], init, model), config.seeds[0])
                job = trial_job(config, group, first, "preflight")
                try:
                    preflight(job)
                except OctsslError as err:
                    raise ConfigError(f"cell {group.cell.key}: {err}") from None
    return facts


def _ray_up(config: SweepConfig) -> int:
    """Start (or join) Ray; the number of trials the cluster fits at once."""
    want = config.resources
    have = require("a trial", want.cpus_per_trial, want.gpus_per_trial)
    fits = int(have.get("CPU", 0.0) // want.cpus_per_trial)
    if want.gpus_per_trial > 0:
        fits = min(fits, int(have.get("GPU", 0.0) // want.gpus_per_trial))
    return want.max_concurrent_trials or max(1, fits)


def run_sweep(config: SweepConfig, *, resume: bool | str = False, progress: bool = True) -> SweepSummary:
    """Run the whole sweep (or, with ``resume``, continue it in its own SWEEP_DIR, see :func:`sweep_dir_of`);
    returns what it wrote to summary.json, typed. A sweep that already ended is read back from its
    summary.json (:func:`octssl.tune.results.read_sweep_summary`) and returned as it is."""

    started = time.time()
    timings: dict[str, float] = {}
    config, place, resuming = sweep_dir_of(config, resume)
    if resuming and (ended := _finished(place)) is not None:
        return ended
    facts = preflight_sweep(config)
    timings["preflight"] = time.time() - started
    if config.metrics_port is not None:
        serve(config.metrics_port)
    concurrent = _ray_up(config)
    sweep_dir = staged_sweep_dir(place, keep=resuming)
    if not resuming:
        (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))

    tracked = open_sweep_run(config, sweep_dir)  # MLflow's parent run, when tracking is on

    t0 = time.time()
    trials = _search(config, sweep_dir, place, concurrent, progress, resuming, tracked)
    write_parquet(sweep_dir / "trials.parquet", published(trials, sweep_dir, place))
    timings["search"] = time.time() - t0

    t0 = time.time()
    chosen = choose(trials, config)
    rows, previews, errors = evaluate_chosen(config, chosen, facts, progress)
    write_parquet(sweep_dir / "results.parquet", rows, RESULT_COLUMNS)
    timings["test"] = time.time() - t0

    t0 = time.time()
    figure_data(config, sweep_dir, previews, facts)
    timings["figures"] = time.time() - t0

    summary = summarise(config, trials, chosen, rows, errors, facts)
    summary.sweep_dir = str(place)
    # one bundle per task: its best cell's chosen trial
    summary.bundles = published(write_sweep_bundles(sweep_dir, summary, named=str(place)), sweep_dir, place)
    timings["total"] = time.time() - started  # the report's own build time is added after it
    summary.timings_s = {k: round(v, 2) for k, v in timings.items()}
    (sweep_dir / "summary.json").write_text(summary.model_dump_json(indent=2))
    t0 = time.time()
    build_report(sweep_dir)
    summary.timings_s["report"] = round(time.time() - t0, 2)
    (sweep_dir / "summary.json").write_text(summary.model_dump_json(indent=2))
    if tracked is not None:
        finish_sweep_run(tracked, sweep_dir, summary.test_metrics())
    if place.remote:
        upload_tree(sweep_dir, place, last=("bundles/*/config.json", "summary.json"))  # whole bundles, then done
        shutil.rmtree(sweep_dir)  # the sweep's files now live on the object store
    return summary


# ---------------------------------------------------------------- search
def _search(config: SweepConfig, sweep_dir: Path, place: Location, concurrent: int,
            progress: bool, resuming: bool = False, tracked: TrackedRun | None = None) -> list[dict[str, Any]]:
    """One Tune experiment in ``SWEEP_DIR/tune``; a resumed sweep restores it (:func:`_restored_tuner`)."""
    from ray import tune

    from octssl.tune.live import SweepProgress
    from octssl.tune.search import GroupASHA, GroupSearch, make_sampler, sampler_name, val_history
    from octssl.tune.trial import FORWARDED_ENV, TrialPlan, run_trial

    sampler_name(config.search)  # the configured sampler is there, or the sweep stops before any trial
    groups = config.groups
    total = len(groups) * config.search.num_samples
    plan = TrialPlan(config=config, trials_dir=str(sweep_dir / "trials"),
                     env={k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
    resources = {"CPU": config.resources.cpus_per_trial, "GPU": config.resources.gpus_per_trial}
    watcher = SweepProgress(config, run=config.name or "sweep", total=total, enabled=progress)
    callbacks = [watcher] + ([trial_callback(tracked, config)] if tracked is not None else [])
    # Our own progress display replaces Tune's console output (its new output engine ignores verbose=0).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune saves its experiment state (trials' status and checkpoints, the search) at most this often: what a
    # killed driver can lose. Its default adapts upwards from 10 s; a sweep's state is small, save it often.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    # Tune also saves it with every trial checkpoint (one per evaluation) and warns when that happens often;
    # with short trials it does, by design: the saves are small.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    storage_path, storage_filesystem = ray_storage(str(place))  # Tune's state: on the object store itself
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), resources)
    tuner = _restored_tuner(f"{storage_path}/tune", storage_filesystem, trainable, callbacks, watcher) if resuming else None
    if tuner is None:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=GroupSearch(groups, config.search.num_samples, lambda g: make_sampler(config.search, g)),
                scheduler=GroupASHA(config.search, history=functools.partial(val_history, plan.trials_dir)),
                num_samples=total,
                max_concurrent_trials=concurrent,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name="tune", storage_path=storage_path, storage_filesystem=storage_filesystem, verbose=0,
                callbacks=callbacks, failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),  # a trial resumes from its last one
            ),
        )
    watcher.start()
    try:
        with _sigterm_as_sigint():
            grid = tuner.fit()
    finally:
        watcher.stop()
    if len(grid) < total:  # Tune stops gracefully on Ctrl-C and returns what ran: do not report that as done
        raise OctsslError(f"{place}: sweep interrupted after {len(grid)} of {total} trials; no results written "
                          "(continue it with --resume)")
    return [trial_row(config, sweep_dir, grid[i]) for i in range(len(grid))]


@contextmanager
def _sigterm_as_sigint() -> Iterator[None]:
    """A preempted sweep driver (SIGTERM) stops as on Ctrl-C: Tune ends its trials, saves the experiment's
    state and returns, and the sweep stops with "continue it with --resume". Trials keep the checkpoint of
    their last evaluation; the work since then is redone on resume."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: signal.raise_signal(signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _restored_tuner(path: str, filesystem: Any, trainable: Any, callbacks: list[Any], watcher: Any) -> Any:
    """Ray Tune's own restore of the experiment at ``path``, or None when it never saved its state (killed
    before its first experiment checkpoint: the sweep then starts its search again).

    Tune keeps finished and failed trials as they are (``resume_errored=False``: a failed trial is a
    result), puts unfinished ones back in the queue from their last checkpoint, and restores the search
    (GroupSearch.save/restore). It does not keep the scheduler's state: GroupASHA rebuilds its rungs from
    the trials' val.jsonl as Tune re-adds them. ``Tuner.restore`` takes no callbacks, so the restored run
    config gets this process's callbacks (progress display, MLflow child runs) in place of the pickled ones."""
    from ray import tune

    if not tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        return None
    tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                               restart_errored=False, storage_filesystem=filesystem)
    if tuner._local_tuner is not None:  # a Tuner made on the driver (not a remote one) has it
        tuner._local_tuner.get_run_config().callbacks = callbacks
    watcher.restored(tuner.get_results())
    return tuner
