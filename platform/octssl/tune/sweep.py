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

import logging
import os
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from octssl.cluster.local import require
from octssl.config.sweep import SCRATCH, Cell, Group, SweepConfig, load_sweep_config, trial_job
from octssl.errors import ConfigError, CorpusError, OctsslError
from octssl.observe.tracking import TrackedRun, finish_sweep_run, open_sweep_run, trial_callback
from octssl.storage.location import Location, absolute, ray_storage, upload_tree
from octssl.tune.results import (
    RESULT_COLUMNS,
    choose,
    published,
    staged_sweep_dir,
    summarise,
    trial_row,
    write_parquet,
)
from octssl.tune.testsplit import evaluate_chosen, figure_data

__all__ = ["load_sweep_config", "preflight_sweep", "run_sweep", "sweep_dir_of"]


def sweep_dir_of(config: SweepConfig) -> tuple[SweepConfig, Location]:
    """The config with absolute paths (trials run with another working directory; URLs stay URLs) and a
    fresh SWEEP_DIR (a folder or an object-store prefix)."""
    config = config.model_copy(deep=True)
    config.name = config.name or f"sweep-{datetime.now():%Y%m%d-%H%M%S}"
    config.storage_path = absolute(config.storage_path)
    config.corpus = absolute(config.corpus)
    config.inits = {k: v if v == SCRATCH else absolute(v) for k, v in config.inits.items()}
    sweep_dir = Location.parse(config.storage_path) / config.name
    if sweep_dir.exists():
        raise ConfigError(f"{sweep_dir} already exists: choose another name (a sweep is never resumed in place)")
    return config, sweep_dir


def preflight_sweep(config: SweepConfig) -> dict[str, Any]:
    """Fail with the reason before any trial starts; returns per-cell facts (labelled patients, volumes)."""
    from octssl.corpus.store import Corpus
    from octssl.data.version import corpus_version
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


def run_sweep(config: SweepConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run the whole sweep; returns summary.json's content."""
    from octssl.tune.report import build_report

    started = time.time()
    timings: dict[str, float] = {}
    config, place = sweep_dir_of(config)
    facts = preflight_sweep(config)
    timings["preflight"] = time.time() - started
    if config.metrics_port is not None:
        from octssl.observe.metrics import serve

        serve(config.metrics_port)
    concurrent = _ray_up(config)
    sweep_dir = staged_sweep_dir(place)
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    tracked = open_sweep_run(config, sweep_dir)  # MLflow's parent run, when tracking is on

    t0 = time.time()
    trials = _search(config, sweep_dir, place, concurrent, progress, tracked)
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
    from octssl.tune.bundles import write_sweep_bundles  # one bundle per task: its best cell's chosen trial

    summary.bundles = published(write_sweep_bundles(sweep_dir, summary, named=str(place)), sweep_dir, place)
    timings["total"] = time.time() - started  # the report's own build time is added after it
    summary.timings_s = {k: round(v, 2) for k, v in timings.items()}
    (sweep_dir / "summary.json").write_text(summary.model_dump_json(indent=2))
    t0 = time.time()
    build_report(sweep_dir)
    summary.timings_s["report"] = round(time.time() - t0, 2)
    (sweep_dir / "summary.json").write_text(summary.model_dump_json(indent=2))
    if tracked is not None:
        finish_sweep_run(tracked, sweep_dir, summary.model_dump(mode="json"))
    if place.remote:
        upload_tree(sweep_dir, place, last=("bundles/*/config.json", "summary.json"))  # whole bundles, then done
        shutil.rmtree(sweep_dir)  # the sweep's files now live on the object store
    return summary.model_dump(mode="json")


# ---------------------------------------------------------------- search
def _search(config: SweepConfig, sweep_dir: Path, place: Location, concurrent: int,
            progress: bool, tracked: TrackedRun | None = None) -> list[dict[str, Any]]:
    from ray import tune

    from octssl.tune.live import SweepProgress
    from octssl.tune.search import GroupASHA, GroupSearch, make_sampler, sampler_name
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
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    storage_path, storage_filesystem = ray_storage(str(place))  # Tune's state: on the object store itself
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(run_trial, plan=plan), resources),
        tune_config=tune.TuneConfig(
            search_alg=GroupSearch(groups, config.search.num_samples, lambda g: make_sampler(config.search, g)),
            scheduler=GroupASHA(config.search),
            num_samples=total,
            max_concurrent_trials=concurrent,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name="tune", storage_path=storage_path, storage_filesystem=storage_filesystem, verbose=0, callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        ),
    )
    watcher.start()
    try:
        grid = tuner.fit()
    finally:
        watcher.stop()
    if len(grid) < total:  # Tune stops gracefully on Ctrl-C and returns what ran: do not report that as done
        raise OctsslError(f"{place}: sweep interrupted after {len(grid)} of {total} trials; no results written")
    return [trial_row(config, sweep_dir, grid[i]) for i in range(len(grid))]
