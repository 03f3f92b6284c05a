"""Sweep results: one row per trial (status, val Dice), the chosen trial per group, the per-cell summary,
and where they are written (SWEEP_DIR itself, or a local staging folder for a SWEEP_DIR on object storage)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from octssl.apply.metrics import pooled
from octssl.cluster.local import root_cause
from octssl.config.sweep import SweepConfig
from octssl.storage.location import Location, staging_dir
from octssl.tune.summary import SweepCell, SweepSummary
from octssl.vocab import DICE, HD95, OVERLAP_PX, PRED_PX, PRIMARY_METRIC, SEGMENTATION, THRESHOLD, TRUTH_PX

METRIC = PRIMARY_METRIC[SEGMENTATION]  # what picks a trial's best checkpoint and the chosen trial

#: trial statuses in trials.parquet and summary.json
OK, STOPPED, ERROR = "ok", "stopped", "error"
STATUSES = (OK, STOPPED, ERROR)
RESULT_COLUMNS = ("task", "fraction", "init", "model", "seed", "trial", THRESHOLD, "id", DICE, HD95, TRUTH_PX, PRED_PX,
                  OVERLAP_PX)


def stopped_early(last_step: int, steps: int) -> bool:
    """Whether a trial that ended without error was stopped by ASHA before its planned ``steps``."""
    return last_step < steps


def trial_row(config: SweepConfig, sweep_dir: Path, result: Any) -> dict[str, Any]:
    params = result.config
    group = next(g for g in config.groups if g.key == params["group"])
    run_dir = sweep_dir / "trials" / params["trial"]
    vals = _read_jsonl(run_dir / "val.jsonl")
    scored = [v for v in vals if v.get(METRIC) is not None and not math.isnan(v[METRIC])]
    dices = [v[METRIC] for v in scored]
    best = max(scored, key=lambda v: v[METRIC]) if scored else {}  # the evaluation that wrote best/
    metrics = result.metrics or {}
    last_step = max([int(v["step"]) for v in vals] or [0])
    if result.error is not None:
        status = ERROR
    elif stopped_early(last_step, params["steps"]):
        status = STOPPED
    else:
        status = OK
    return {
        "trial": params["trial"], "group": group.key, "cell": group.cell.key, "task": group.cell.task,
        "fraction": group.cell.fraction, "init": group.cell.init, "model": group.cell.model, "seed": group.seed,
        "lr": params["lr"], "weight_decay": params["weight_decay"], "steps": params["steps"],
        "status": status, "val_dice_pooled": max(dices) if dices else None,
        "last_val_dice_pooled": dices[-1] if dices else None, THRESHOLD: best.get(THRESHOLD, 0.5),
        "last_step": last_step, "wall_s": metrics.get("time_total_s"),
        "error": root_cause(result.error) if result.error is not None else None,
        "best_weights": str(run_dir / "best" / "model.safetensors"),
    }


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def choose(trials: list[dict[str, Any]], config: SweepConfig) -> dict[str, dict[str, Any]]:
    """Per group, the trial with the best pooled val Dice whose best weights exist (groups with none are absent)."""
    chosen: dict[str, dict[str, Any]] = {}
    for group in config.groups:
        candidates = [t for t in trials if t["group"] == group.key and t["val_dice_pooled"] is not None
                      and Path(t["best_weights"]).is_file()]
        if candidates:
            chosen[group.key] = max(candidates, key=lambda t: (t["val_dice_pooled"], -t["steps"]))
    return chosen


def summarise(config: SweepConfig, trials: list[dict[str, Any]], chosen: dict[str, dict[str, Any]],
              rows: list[dict[str, Any]], errors: dict[str, str], facts: dict[str, Any]) -> SweepSummary:
    cells = []
    for cell in config.cells:
        mine = [r for r in rows if (r["task"], r["fraction"], r["init"], r["model"]) ==
                (cell.task, cell.fraction, cell.init, cell.model)]
        dice = np.array([r[DICE] for r in mine], float)
        hd95 = np.array([r["hd95_mm"] for r in mine], float)
        lesion = np.array([r[TRUTH_PX] > 0 for r in mine], bool)
        seeds = sorted({r["seed"] for r in mine})
        per_seed = [float(np.mean([r[DICE] for r in mine if r["seed"] == s])) for s in seeds]
        picks = [dict(chosen[g.key]) for g in config.groups if g.cell == cell and g.key in chosen]
        best = max(picks, key=lambda t: t["val_dice_pooled"]) if picks else None
        # the bundle's trial on its own, at the threshold it chose on val (what the bundle ships and reports)
        best_test = {**pooled([r for r in mine if r["trial"] == best["trial"]]), THRESHOLD: best[THRESHOLD],
                     "trial": best["trial"]} if best else None
        cell_trials = [t for t in trials if t["cell"] == cell.key]
        failed = [f"seed {g.seed}: {errors[g.key]}" for g in config.groups if g.cell == cell and g.key in errors]
        failed += [f"seed {g.seed}: every trial failed" for g in config.groups
                   if g.cell == cell and g.key not in chosen]
        cells.append(SweepCell.model_validate({
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
            "best_test": best_test,
            "seed_configs": [_config_of(p) for p in picks],
            "trials": len(cell_trials),
            "trials_failed": sum(t["status"] == ERROR for t in cell_trials),
            "trials_stopped": sum(t["status"] == STOPPED for t in cell_trials),
            "errors": failed,
        }))
    statuses = [t["status"] for t in trials]
    return SweepSummary(**{
        "name": config.name, "corpus": config.corpus, "corpus_version": facts["corpus_version"], "tasks": config.tasks,
        "fractions": sorted({c.fraction for c in config.cells}),
        "inits": config.inits, "models": config.models, "seeds": config.seeds,
        "num_samples": config.search.num_samples, "search": config.search.algorithm,
        "sampler": _sampler_name(config),
        "trials": {s: statuses.count(s) for s in STATUSES},
        "cells": cells,
    })


def _sampler_name(config: Any) -> str:
    from octssl.tune.search import sampler_name

    return sampler_name(config.search)


def _config_of(trial: dict[str, Any]) -> dict[str, Any]:
    return {k: trial[k] for k in ("trial", "seed", "lr", "weight_decay", "steps", "val_dice_pooled", THRESHOLD)}


def write_parquet(path: Path, rows: list[dict[str, Any]], columns: tuple[str, ...] | None = None) -> None:
    if not rows and columns:
        table = pa.table({c: pa.array([], pa.string() if c in ("task", "init", "model", "trial", "id")
                                      else pa.float64()) for c in columns})
    else:
        table = pa.Table.from_pylist(rows)
    pq.write_table(table, path)


def staged_sweep_dir(place: Location, *, keep: bool = False) -> Path:
    """The local folder the sweep writes into: SWEEP_DIR itself, or for a SWEEP_DIR on an object store
    a staging folder (``OCTSSL_STAGING``) uploaded there when the sweep ends. A new sweep starts it
    empty; a resumed one (``keep``) continues in what its interrupted attempt wrote."""

    if not place.remote:
        place.local.mkdir(parents=True, exist_ok=keep)
        return place.local
    folder = staging_dir(place)
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)  # what an earlier attempt under this name left
    folder.mkdir(parents=True, exist_ok=keep)
    return folder


def published(value: Any, folder: Path, place: Location) -> Any:
    """``value`` (rows, a summary) with every path under the staging ``folder`` renamed to its place in
    SWEEP_DIR (unchanged when the sweep writes SWEEP_DIR itself)."""
    if isinstance(value, str) and (value == str(folder) or value.startswith(f"{folder}/")):
        return str(place) + value[len(str(folder)):]
    if isinstance(value, dict):
        return {k: published(v, folder, place) for k, v in value.items()}
    if isinstance(value, list):
        return [published(v, folder, place) for v in value]
    return value
