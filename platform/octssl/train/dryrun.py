"""Dry run: what a training job or sweep would do (steps, samples, memory, wall time), without training.

``octssl pretrain|finetune|sweep --dry-run`` prints this plan. It opens the training data the way the loop
does (``octssl.data.feed``) to count volumes and steps; when they are not there, the plan says so and
keeps what the config alone determines. It also says where the run would be written and checks that this
name is free (or, with ``--resume``, that the run is there). Whatever would stop the real run (data not
available, the run folder taken, init weights missing) is listed under ``cannot_run``, and the command
exits non-zero after printing the plan. Nothing is allocated: the parameter count and FLOPs come from the meta device,
the activation memory from one fake-tensor step (:func:`octssl.models.profile.training_activation_bytes`),
and the wall time from the newest benchmark result for the device in ``benchmarks/results/``.
"""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from octssl.config.job import JobConfig
from octssl.config.sweep import trial_job
from octssl.corpus.layout import split_shortfall
from octssl.corpus.store import Corpus
from octssl.errors import OctsslError
from octssl.models.precision import resolve_precision
from octssl.storage.location import Location

#: Depth assumed when no corpus is there to tell it: the paper's volumes were flattened and cut to 128.
PAPER_DEPTH = 128
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
GIB = 2**30


# ---------------------------------------------------------------- data
def _data_facts(config: JobConfig) -> tuple[dict[str, Any], int | None]:
    """What the training data say (through the loop's own data interface, so the counts are the loop's),
    or why they are not available; and the steps per epoch per worker (None when unknown)."""
    from octssl.data.feed import build_train_data

    try:
        data = build_train_data(config, 0, config.scaling.workers)
    except OctsslError as err:
        return {"data": f"not available ({err}): volume count unknown", "data_problem": str(err)}, None
    return {"data": data.where, "train_volumes": data.volumes, "grids": data.grids}, data.steps_per_epoch


def _schedule(config: JobConfig, per_epoch: int | None) -> dict[str, Any]:
    """Steps, samples and epochs per worker; None where they depend on an unknown volume count."""
    c = config
    world, batch = c.scaling.workers, c.data.batch_size
    steps: int | None = c.run.max_steps
    epochs: float | None = c.run.epochs if steps is None else None
    if per_epoch is not None:
        steps = c.run.total_steps(per_epoch)
        epochs = steps / per_epoch
    out: dict[str, Any] = {
        "workers": world, "batch_per_worker": batch, "global_batch": world * batch, "steps_per_epoch": per_epoch,
        "samples_per_epoch": None if per_epoch is None else per_epoch * world * batch, "steps": steps,
        "epochs": epochs, "samples": None if steps is None else steps * world * batch,
    }
    if steps is None and epochs is not None:
        crops = c.data.crops_per_volume
        out["steps_formula"] = (f"{epochs:g} epochs x {crops} crops x N train volumes / ({world} workers x batch "
                                f"{batch}) = {epochs * crops / (world * batch):g} x N")
    return out


# ---------------------------------------------------------------- model cost
def parameter_count(config: JobConfig, shape: tuple[int, ...]) -> int:
    """Trainable parameters of the job's model (built as the Trainer builds it, on the meta device), after
    checking that the input ``shape`` (B, C, nB, D, W) fits it."""
    from octssl.train.components import build_components

    with torch.device("meta"):
        model = build_components(config, load_init=False).model
    model.check_input_shape(shape)  # ModelError naming each dimension that does not fit
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@lru_cache(maxsize=32)
def _flops(name: str, width: float, crop: tuple[int, int, int]) -> float:
    from octssl.models.profile import count_flops

    return count_flops(name, crop, width=width)["forward_backward"]


@lru_cache(maxsize=32)
def _activations(name: str, width: float, crop: tuple[int, int, int], batch: int, precision: str, ckpt: bool) -> int:
    from octssl.models.profile import training_activation_bytes

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return training_activation_bytes(name, crop, batch, autocast_dtype=dtype, width=width,
                                     checkpointing=ckpt)["activations"]


def memory(name: str, width: float, crop: tuple[int, int, int], precision: str, batch: int) -> dict[str, float]:
    """Activation GiB per worker at ``batch``, without and with activation checkpointing."""
    return {f"activations_gib{'_checkpointing' if ckpt else ''}": _activations(name, width, crop, batch, precision, ckpt) / GIB
            for ckpt in (False, True)}


# ---------------------------------------------------------------- benchmark results
def device_slug(gpu: bool) -> str | None:
    """This machine's device in benchmark file names ('cuda-nvidia-h200', 'cpu-amd-epyc'); None: no GPU here."""
    if gpu:
        return None if not torch.cuda.is_available() else "cuda-" + _slug(torch.cuda.get_device_name())
    name = "unknown CPU"
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return "cpu-" + _slug(name)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def benchmark_rows(gpu: bool, results: Path = RESULTS) -> tuple[str | None, list[dict[str, Any]]]:
    """The newest train-step results for this device (any GPU's when none is visible here), their rows
    tagged with the file; the device name first."""
    slug = device_slug(gpu)
    pattern = f"*-{slug}.json" if slug else "*-cuda-*.json"
    found = []
    for path in sorted(results.glob(pattern)) if results.is_dir() else []:
        if not path.name.startswith(("step-", "levers-")):
            continue
        result = json.loads(path.read_text())
        found.append((result.get("env", {}).get("finished_utc") or "", path.name, result))
    if not found:
        return None, []
    found.sort(key=lambda item: item[0])
    device = found[-1][2].get("env", {}).get("device")
    rows = [{**r, "file": name, "model": result.get("model", "fpn")} for _, name, result in found
            if result.get("env", {}).get("device") == device for r in result.get("rows", [])]
    return device, [r for r in rows if r.get("status") == "ok" and r.get("volumes_per_s")]


def wall_time(config: JobConfig, crop: tuple[int, int, int], steps: int | None, results: Path = RESULTS) -> dict[str, Any]:
    """Estimated training seconds per worker from the closest measured row, scaled by FLOPs to this job."""
    c = config
    gpu = c.scaling.gpus_per_worker > 0
    device, rows = benchmark_rows(gpu, results)
    if not rows:
        where = "a GPU" if gpu else "this CPU"
        return {"wall": f"unmeasured (no train-step benchmark for {where} in benchmarks/results/)"}
    precision = resolve_precision(c.deepspeed.precision, gpu=gpu)
    same = [r for r in rows if r.get("precision") == precision.name and not r.get("compile")
            and bool(r.get("checkpointing")) == c.model.checkpointing]
    if not same:
        return {"wall": f"unmeasured ({device}: no {precision.name} row"
                        f"{' with checkpointing' if c.model.checkpointing else ''} in benchmarks/results/)"}
    batch = c.data.batch_size
    best = max(same, key=lambda r: (r.get("engine") == "deepspeed", bool(r.get("channels_last")) == precision.channels_last,
                                    -abs(math.log2(r["batch"] / batch))))
    measured_crop = tuple(best["crop"])
    scale = _flops(best["model"], 1.0, measured_crop) / _flops(c.model.name, c.model.width, crop)
    vol_s = best["volumes_per_s"] * scale
    out: dict[str, Any] = {"measured_on": device, "volumes_per_s": vol_s,
                           "from": f"row '{best['label']}' of {best['file']} ({best['volumes_per_s']:.3g} vol/s at "
                                   f"{'x'.join(map(str, measured_crop))}, x{scale:.3g} by FLOPs)"}
    if steps is not None:
        out["seconds"] = steps * batch / vol_s
    else:
        out["seconds_per_1000_steps"] = 1000 * batch / vol_s
    return out


# ---------------------------------------------------------------- plans
def run_place(config: JobConfig, resume: bool | str) -> tuple[str, str | None]:
    """(where the run would write, why it could not start there or None): the checks ``octssl.train.launch``
    makes before training, without its side effects (``resume="auto"``: --resume-if-exists)."""

    storage = Location.parse(config.run.storage_path)
    storage = storage if storage.remote else Location.parse(str(storage.local.resolve()))
    if resume == "auto":
        if config.run.name is None:
            return f"{storage}/<no name>", "--resume-if-exists needs the run's name: --set run.name=NAME"
        resume = (storage / config.run.name).exists()
    if config.run.name is None:
        if resume:
            return f"{storage}/<no name>", "--resume needs the run's name: --set run.name=NAME"
        return f"{storage}/{config.kind}-<date>-<time> (a new name; set run.name to choose it)", None
    run_dir = storage / config.run.name
    if resume and not run_dir.exists():
        return str(run_dir), f"{run_dir}: no such run to resume"
    if not resume and run_dir.exists():
        return str(run_dir), f"{run_dir} already exists: pass --resume to continue it, or choose another run.name"
    return str(run_dir) + (" (resumed)" if resume else ""), None


def split_problem(config: JobConfig) -> str | None:
    """Why a segmentation job's corpus cannot train and validate its label honestly (no labelled train or val
    volume), or None; also None when the corpus cannot be opened (the data check reports that)."""

    if config.objective.kind != "segmentation" or not config.data.corpus:
        return None
    try:
        corpus = Corpus.open(config.data.corpus)
    except (OctsslError, OSError):
        return None
    return split_shortfall(corpus.rows, config.objective.target, config.data.corpus)


def job_plan(config: JobConfig, results: Path = RESULTS, resume: bool | str = False) -> dict[str, Any]:
    """Everything the dry run of one pretraining or fine-tuning job prints, as a dict; ``cannot_run`` lists
    what would stop the real run (empty when it could start)."""
    c = config
    facts, per_epoch = _data_facts(c)
    blockers = [] if "train_volumes" in facts else [facts["data_problem"]]
    writes_to, taken = run_place(c, resume)
    blockers += [problem for problem in (taken, split_problem(c)) if problem]
    grids = facts.get("grids") or []
    if len(grids) == 1:
        depth = int(grids[0].split("x")[1])
        facts["depth"] = f"{depth} (the corpus grid {grids[0]})"
    else:
        depth = PAPER_DEPTH
        facts["depth"] = f"{depth} (assumed, the paper's: {'no data' if not grids else f'grids {grids}'})"
    crop = (c.data.crop[0], depth, c.data.crop[1])
    schedule = _schedule(c, per_epoch)
    precision = resolve_precision(c.deepspeed.precision, gpu=c.scaling.gpus_per_worker > 0)
    facts.pop("data_problem", None)
    plan: dict[str, Any] = {
        "kind": c.kind, "objective": f"{c.objective.kind} of {c.objective.target}", **facts,
        "crop_nB_D_W": list(crop), "model": c.model.name, "width": c.model.width,
        "parameters": parameter_count(c, (c.data.batch_size, 1, *crop)),
        "precision": f"{precision.name}{' + channels_last_3d inputs' if precision.channels_last else ''}",
        "device": f"GPU x{c.scaling.gpus_per_worker:g} per worker" if c.scaling.gpus_per_worker else "CPU",
        "checkpointing": c.model.checkpointing, **schedule,
        **memory(c.model.name, c.model.width, crop, precision.name, c.data.batch_size),
    }
    if c.objective.kind == "segmentation":
        plan["label_fraction"] = c.objective.label_fraction
    if c.run.init != "scratch":
        plan["init"] = c.run.init + ("" if Path(c.run.init).is_file() else " (not found yet)")
        blockers += [] if Path(c.run.init).is_file() else [f"{c.run.init}: run.init weights not found"]
    plan.update(wall_time(c, crop, schedule["steps"], results))
    plan["writes_to"] = writes_to
    plan["cannot_run"] = blockers
    return plan


def sweep_plan(config: Any, results: Path = RESULTS) -> dict[str, Any]:
    """The dry run of a sweep: its grid, and one trial's plan per task and fraction at the longest step count."""

    steps = max(config.search.steps)
    blockers = [] if Path(config.corpus).is_dir() else [f"{config.corpus}: no corpus directory here"]
    blockers += [f"{path}: init '{name}' weights not found" for name, path in config.inits.items()
                 if path != "scratch" and not Path(path).is_file()]
    storage = Location.parse(config.storage_path)
    sweep_dir = (storage if storage.remote else Location.parse(str(storage.local.resolve()))) / (config.name or "")
    if config.name and sweep_dir.exists():
        blockers.append(f"{sweep_dir} already exists: choose another name (a sweep is never resumed in place)")
    trials = len(config.groups) * config.search.num_samples
    plan: dict[str, Any] = {
        "kind": "sweep", "corpus": config.corpus + ("" if Path(config.corpus).is_dir() else " (not found)"),
        "cells": len(config.cells), "seeds": config.seeds, "trials": trials, "steps_per_trial": config.search.steps,
        "inits": {name: path if path == "scratch" or Path(path).is_file() else f"{path} (not found yet)"
                  for name, path in config.inits.items()},
        "trial_plans": [],
    }
    seen = set()
    total = 0.0
    for group in config.groups:
        cell = group.cell
        if (cell.task, cell.fraction, cell.model) in seen:
            continue
        seen.add((cell.task, cell.fraction, cell.model))
        job = trial_job(config, group, {"lr": config.search.lr[0], "weight_decay": config.search.weight_decay[0],
                                        "steps": steps}, f"dry-run-{cell.key}")
        one = job_plan(job, results)
        blockers += [b for b in one.pop("cannot_run") if b not in blockers and "already exists" not in b]
        one.pop("writes_to")
        plan["trial_plans"].append({"cell": f"{cell.task} f{cell.fraction:g} {cell.model}", **one})
        if "seconds" in one:
            same_cell = sum(1 for g in config.groups if (g.cell.task, g.cell.fraction, g.cell.model) == (cell.task, cell.fraction, cell.model))
            total += one["seconds"] * same_cell * config.search.num_samples
    if plan["trial_plans"] and all("seconds" in p for p in plan["trial_plans"]):
        plan["all_trials_seconds"] = total
    plan["writes_to"] = str(sweep_dir) if config.name else f"{sweep_dir}sweep-<date>-<time> (set name to choose it)"
    plan["cannot_run"] = blockers
    return plan


# ---------------------------------------------------------------- text
def _value(key: str, value: Any) -> str:
    if value is None:
        return "unknown"
    if key.endswith("seconds"):
        return _duration(value)
    if key.endswith("_gib") or key.endswith("_gib_checkpointing"):
        return f"{value:.2f} GiB"
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(map(str, value)) if key != "crop_nB_D_W" else " x ".join(map(str, value))
    return str(value)


def _duration(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:.1f} h ({hours / 24:.1f} days)" if hours >= 24 else f"{hours:.2f} h" if hours >= 1 else f"{seconds / 60:.1f} min"


LABELS = {"writes_to": "run written to", "activations_gib": "activation memory / worker", "activations_gib_checkpointing": "  with checkpointing",
          "seconds": "wall time / worker (train steps)", "seconds_per_1000_steps": "wall time / worker / 1000 steps", "all_trials_seconds": "all trials in a row (upper bound)",
          "volumes_per_s": "estimated volumes/s / worker", "from": "  estimated from"}


def render(plan: dict[str, Any], source: str) -> str:
    """The plan as aligned 'key: value' lines under a header naming the config file."""
    lines = [f"dry run of {source} (nothing is trained)"]

    def line(key: str, value: Any, indent: str = "") -> str:
        return f"{indent}{LABELS.get(key, key.replace('_', ' ')):{40 - len(indent)}s} {_value(key, value)}"

    for key, value in plan.items():
        if key == "cannot_run":
            continue  # said last, as the verdict
        if key != "trial_plans":
            lines.append(line(key, value))
            continue
        shared = {k: v for k, v in value[0].items() if k not in ("cell", "kind") and all(t.get(k) == v for t in value)}
        lines.append("\nevery trial:")
        lines += [line(k, v, "  ") for k, v in shared.items()]
        for trial in value:
            lines.append(f"one trial of {trial['cell']}:")
            lines += [line(k, v, "  ") for k, v in trial.items() if k not in shared and k not in ("cell", "kind")]
    blockers = plan.get("cannot_run") or []
    lines.append("\n" + (f"this plan cannot run ({len(blockers)} problem(s)):" if blockers else "this plan can run"))
    lines += [f"  - {b}" for b in blockers]
    return "\n".join(lines)
