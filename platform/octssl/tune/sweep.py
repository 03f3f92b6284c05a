"""`octssl sweep`: fine-tune every task x label fraction x init x model with a Ray Tune search, pick each
cell's best trial on the val split, evaluate it on the test split and write the label-efficiency report.

Stages, each timed in summary.json: ``preflight`` (everything checkable before a trial starts: corpus,
labels per task and split, weights files and their fit to each model, the trial jobs themselves),
``search`` (one Tune experiment, see :mod:`octssl.tune.search`), ``test`` (Ray tasks evaluating the
chosen weights per test volume), ``figures`` and ``report``. A failed trial is recorded with its error
and the sweep goes on; a group whose trials all failed is reported as failed.

Outputs in ``SWEEP_DIR = storage_path/name``: ``sweep.yaml`` (resolved config), ``trials.parquet``
(one row per trial), ``results.parquet`` (one row per test volume, cell and seed), ``summary.json``,
``figures/*.npz`` (the arrays behind the figures), ``report.md`` and its PNGs; ``trials/<trial>/`` are
the trials' run directories and ``tune/`` is Ray Tune's experiment state.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from octssl.errors import ConfigError, CorpusError, OctsslError
from octssl.tune.config import SCRATCH, Cell, Group, SweepConfig, load_sweep_config, trial_job

__all__ = ["load_sweep_config", "preflight_sweep", "run_sweep", "sweep_dir_of"]


def sweep_dir_of(config: SweepConfig) -> tuple[SweepConfig, Path]:
    """The config with absolute paths (trials run with another working directory) and a fresh SWEEP_DIR."""
    config = config.model_copy(deep=True)
    config.name = config.name or f"sweep-{datetime.now():%Y%m%d-%H%M%S}"
    config.storage_path = str(Path(config.storage_path).expanduser().resolve())
    config.corpus = str(Path(config.corpus).expanduser().resolve())
    config.inits = {k: v if v == SCRATCH else str(Path(v).expanduser().resolve()) for k, v in config.inits.items()}
    sweep_dir = Path(config.storage_path) / config.name
    if sweep_dir.exists():
        raise ConfigError(f"{sweep_dir} already exists: choose another name (a sweep is never resumed in place)")
    return config, sweep_dir


def preflight_sweep(config: SweepConfig) -> dict[str, Any]:
    """Fail with the reason before any trial starts; returns per-cell facts (labelled patients, volumes)."""
    from octssl.corpus.store import Corpus
    from octssl.train.launch import preflight
    from octssl.tune.evaluate import figure_ids

    corpus = Corpus.open(config.corpus)
    for name, path in config.inits.items():
        if path != SCRATCH and not Path(path).is_file():
            raise ConfigError(f"inits.{name}: {path}: no such weights file (pretrain first, or fix the path)")
    facts: dict[str, Any] = {"val": {}, "test": {}, "figure": {}, "cells": {}}
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
    from octssl.train.launch import ray_up

    have = ray_up()
    cpus, gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
    want = config.resources
    if want.cpus_per_trial > cpus or want.gpus_per_trial > gpus:
        raise ConfigError(f"a trial asks {want.cpus_per_trial:g} CPU, {want.gpus_per_trial:g} GPU but the cluster "
                          f"has {cpus:g} CPU, {gpus:g} GPU")
    fits = int(cpus // want.cpus_per_trial)
    if want.gpus_per_trial > 0:
        fits = min(fits, int(gpus // want.gpus_per_trial))
    return want.max_concurrent_trials or max(1, fits)


def run_sweep(config: SweepConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run the whole sweep; returns summary.json's content."""
    from octssl.report import build_report

    started = time.time()
    timings: dict[str, float] = {}
    config, sweep_dir = sweep_dir_of(config)
    facts = preflight_sweep(config)
    timings["preflight"] = time.time() - started
    if config.metrics_port is not None:
        from octssl.monitor import serve

        serve(config.metrics_port)
    concurrent = _ray_up(config)
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))

    t0 = time.time()
    trials = _search(config, sweep_dir, concurrent, progress)
    _write_parquet(sweep_dir / "trials.parquet", trials)
    timings["search"] = time.time() - t0

    t0 = time.time()
    chosen = choose(trials, config)
    rows, previews, errors = _test(config, sweep_dir, chosen, facts, progress)
    _write_parquet(sweep_dir / "results.parquet", rows, _RESULT_COLUMNS)
    timings["test"] = time.time() - t0

    t0 = time.time()
    _figure_data(config, sweep_dir, previews, facts)
    timings["figures"] = time.time() - t0

    summary = summarise(config, trials, chosen, rows, errors, facts)
    summary["sweep_dir"] = str(sweep_dir)
    timings["total"] = time.time() - started  # the report's own build time is added after it
    summary["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    t0 = time.time()
    build_report(sweep_dir)
    summary["timings_s"]["report"] = round(time.time() - t0, 2)
    (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# ---------------------------------------------------------------- search
def _search(config: SweepConfig, sweep_dir: Path, concurrent: int, progress: bool) -> list[dict[str, Any]]:
    from ray import tune

    from octssl.tune.progress import SweepProgress
    from octssl.tune.search import GroupASHA, GroupSearch, make_sampler
    from octssl.tune.trial import FORWARDED_ENV, TrialPlan, run_trial

    groups = config.groups
    total = len(groups) * config.search.num_samples
    plan = TrialPlan(config=config, trials_dir=str(sweep_dir / "trials"),
                     env={k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
    resources = {"CPU": config.resources.cpus_per_trial, "GPU": config.resources.gpus_per_trial}
    watcher = SweepProgress(config, run=config.name or "sweep", total=total, enabled=progress)
    # Our own progress display replaces Tune's console output (its new output engine ignores verbose=0).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
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
            name="tune", storage_path=str(sweep_dir), verbose=0, callbacks=[watcher],
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        ),
    )
    watcher.start()
    try:
        grid = tuner.fit()
    finally:
        watcher.stop()
    if len(grid) < total:  # Tune stops gracefully on Ctrl-C and returns what ran: do not report that as done
        raise OctsslError(f"{sweep_dir}: sweep interrupted after {len(grid)} of {total} trials; no results written")
    return [_trial_row(config, sweep_dir, result) for result in grid]


def _trial_row(config: SweepConfig, sweep_dir: Path, result: Any) -> dict[str, Any]:
    params = result.config
    group = next(g for g in config.groups if g.key == params["group"])
    run_dir = sweep_dir / "trials" / params["trial"]
    vals = _read_jsonl(run_dir / "val.jsonl")
    dices = [v["dice"] for v in vals if v.get("dice") is not None and not math.isnan(v["dice"])]
    metrics = result.metrics or {}
    last_step = max([int(v["step"]) for v in vals] or [0])
    if result.error is not None:
        status = "error"
    elif last_step < params["steps"]:
        status = "stopped"  # by ASHA
    else:
        status = "ok"
    return {
        "trial": params["trial"], "group": group.key, "cell": group.cell.key, "task": group.cell.task,
        "fraction": group.cell.fraction, "init": group.cell.init, "model": group.cell.model, "seed": group.seed,
        "lr": params["lr"], "weight_decay": params["weight_decay"], "steps": params["steps"],
        "status": status, "val_dice": max(dices) if dices else None, "last_val_dice": dices[-1] if dices else None,
        "last_step": last_step, "wall_s": metrics.get("time_total_s"),
        "error": _error_text(result.error) if result.error is not None else None,
        "best_weights": str(run_dir / "best" / "model.safetensors"),
    }


def _error_text(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def choose(trials: list[dict[str, Any]], config: SweepConfig) -> dict[str, dict[str, Any]]:
    """Per group, the trial with the best val Dice whose best weights exist (groups with none are absent)."""
    chosen: dict[str, dict[str, Any]] = {}
    for group in config.groups:
        candidates = [t for t in trials if t["group"] == group.key and t["val_dice"] is not None
                      and Path(t["best_weights"]).is_file()]
        if candidates:
            chosen[group.key] = max(candidates, key=lambda t: (t["val_dice"], -t["steps"]))
    return chosen


# ---------------------------------------------------------------- test split
_RESULT_COLUMNS = ("task", "fraction", "init", "model", "seed", "trial", "id", "dice", "hd95_mm", "truth_px", "pred_px")


def _test(config: SweepConfig, sweep_dir: Path, chosen: dict[str, dict[str, Any]], facts: dict[str, Any],
          progress: bool) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, str]]:
    """Evaluate each group's chosen weights on the test split, as Ray tasks sized like trials."""
    import ray

    from octssl.tune.evaluate import evaluate_segmentation

    res = config.resources
    task_fn = ray.remote(num_cpus=res.cpus_per_trial, num_gpus=res.gpus_per_trial)(evaluate_segmentation)
    pending = {}
    for group in config.groups:
        if group.key not in chosen:
            continue
        show = facts["figure"][group.cell.task] if group.seed == config.seeds[0] else []
        ref = task_fn.remote(config.corpus, chosen[group.key]["best_weights"], group.cell.task,
                             facts["test"][group.cell.task], show=show, threads=int(res.cpus_per_trial),
                             gpu=res.gpus_per_trial > 0)
        pending[ref] = group
    rows: list[dict[str, Any]] = []
    previews: dict[str, Any] = {}
    errors: dict[str, str] = {}
    with _stage_progress("test split: chosen trials evaluated", len(pending), progress) as advance:
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            group = pending.pop(ref)
            try:
                volume_rows, preview = ray.get(ref)
            except Exception as err:  # one group's failure is recorded, the others still count
                errors[group.key] = _error_text(err)
                advance()
                continue
            cell = group.cell
            for row in volume_rows:
                rows.append({"task": cell.task, "fraction": cell.fraction, "init": cell.init, "model": cell.model,
                             "seed": group.seed, "trial": chosen[group.key]["trial"], **row})
            if preview:
                previews[cell.key] = preview
            advance()
    rows.sort(key=lambda r: (r["task"], r["fraction"], r["init"], r["model"], r["seed"], r["id"]))
    return rows, previews, errors


class _stage_progress:
    """A rich progress bar for a stage of ``total`` items (silent when disabled)."""

    def __init__(self, what: str, total: int, enabled: bool) -> None:
        self.what, self.total, self.enabled = what, total, enabled
        self.bar: Any = None

    def __enter__(self) -> Any:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=Console(stderr=True))
            self.bar.start()
            self.task = self.bar.add_task(self.what, total=self.total)
        return lambda: self.bar.advance(self.task) if self.bar is not None else None

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def _figure_data(config: SweepConfig, sweep_dir: Path, previews: dict[str, Any], facts: dict[str, Any]) -> None:
    """figures/segmentations.npz (test predictions) and figures/reconstructions.npz (pretrained inits)."""
    import ray

    from octssl.tune.evaluate import reconstruct

    out = sweep_dir / "figures"
    out.mkdir(exist_ok=True)
    np.savez_compressed(out / "segmentations.npz",
                        **{f"{cell}|{k}": v for cell, arrays in previews.items() for k, v in arrays.items()})
    res = config.resources
    task_fn = ray.remote(num_cpus=res.cpus_per_trial, num_gpus=res.gpus_per_trial)(reconstruct)
    from octssl.corpus.store import Corpus

    corpus = Corpus.open(config.corpus)
    refs = {}
    for init, path in config.inits.items():
        if path == SCRATCH:
            continue
        from octssl.models.transfer import read_metadata

        target = ((read_metadata(path).get("card") or {}).get("objective") or {}).get("target")
        if target not in ("faf", "slo"):
            continue  # not a reconstruction checkpoint: nothing to show
        ids = corpus.ids(split="val", require=("oct", target))[: config.figure_volumes]
        if ids:
            refs[init] = (task_fn.remote(config.corpus, path, ids, threads=int(res.cpus_per_trial),
                                         gpu=res.gpus_per_trial > 0), ids)
    arrays = {}
    for init, (ref, ids) in refs.items():
        for key, value in ray.get(ref).items():
            arrays[f"{init}|{key}"] = value
        arrays[f"{init}|ids"] = np.array(ids)
    np.savez_compressed(out / "reconstructions.npz", **arrays)


# ---------------------------------------------------------------- summary
def summarise(config: SweepConfig, trials: list[dict[str, Any]], chosen: dict[str, dict[str, Any]],
              rows: list[dict[str, Any]], errors: dict[str, str], facts: dict[str, Any]) -> dict[str, Any]:
    cells = []
    for cell in config.cells:
        mine = [r for r in rows if (r["task"], r["fraction"], r["init"], r["model"]) ==
                (cell.task, cell.fraction, cell.init, cell.model)]
        dice = np.array([r["dice"] for r in mine], float)
        hd95 = np.array([r["hd95_mm"] for r in mine], float)
        lesion = np.array([r["truth_px"] > 0 for r in mine], bool)
        seeds = sorted({r["seed"] for r in mine})
        per_seed = [float(np.mean([r["dice"] for r in mine if r["seed"] == s])) for s in seeds]
        picks = [dict(chosen[g.key]) for g in config.groups if g.cell == cell and g.key in chosen]
        best = max(picks, key=lambda t: t["val_dice"]) if picks else None
        cell_trials = [t for t in trials if t["cell"] == cell.key]
        failed = [f"seed {g.seed}: {errors[g.key]}" for g in config.groups if g.cell == cell and g.key in errors]
        failed += [f"seed {g.seed}: every trial failed" for g in config.groups
                   if g.cell == cell and g.key not in chosen]
        cells.append({
            "task": cell.task, "fraction": cell.fraction, "init": cell.init, "model": cell.model,
            "dice_mean": float(dice.mean()) if dice.size else None,
            "dice_std": float(dice.std()) if dice.size else None,
            "dice_seed_std": float(np.std(per_seed)) if len(per_seed) > 1 else None,
            "dice_seeds": per_seed,
            "hd95_mean": float(np.nanmean(hd95)) if np.isfinite(hd95).any() else None,
            "hd95_undefined": int(np.isnan(hd95).sum()),
            # Dice on a healthy eye is all or nothing (1 if predicted empty): report both parts too
            "dice_lesion_mean": float(dice[lesion].mean()) if lesion.any() else None,
            "healthy_predicted_empty": float((dice[~lesion] == 1).mean()) if (~lesion).any() else None,
            "n_test_healthy": int((~lesion).sum()) // max(1, len(seeds)),
            "n_test": len(facts["test"][cell.task]), "n_seeds": len(seeds),
            **facts["cells"][(cell.task, cell.fraction)],
            "best_config": _config_of(best) if best else None,
            "seed_configs": [_config_of(p) for p in picks],
            "trials": len(cell_trials),
            "trials_failed": sum(t["status"] == "error" for t in cell_trials),
            "trials_stopped": sum(t["status"] == "stopped" for t in cell_trials),
            "errors": failed,
        })
    statuses = [t["status"] for t in trials]
    return {
        "name": config.name, "corpus": config.corpus, "tasks": config.tasks,
        "fractions": sorted({c.fraction for c in config.cells}),
        "inits": config.inits, "models": config.models, "seeds": config.seeds,
        "num_samples": config.search.num_samples, "search": config.search.algorithm,
        "trials": {s: statuses.count(s) for s in ("ok", "stopped", "error")},
        "cells": cells,
    }


def _config_of(trial: dict[str, Any]) -> dict[str, Any]:
    return {k: trial[k] for k in ("trial", "seed", "lr", "weight_decay", "steps", "val_dice")}


def _write_parquet(path: Path, rows: list[dict[str, Any]], columns: tuple[str, ...] | None = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not rows and columns:
        table = pa.table({c: pa.array([], pa.string() if c in ("task", "init", "model", "trial", "id")
                                      else pa.float64()) for c in columns})
    else:
        table = pa.Table.from_pylist(rows)
    pq.write_table(table, path)
