"""`octssl demo`: the whole platform on a synthetic corpus in one command, on a local Ray.

Stages: synthesise a paired corpus -> export WebDataset shards and verify them -> pretrain the FPN to
reconstruct (inverted) FAF from OCT with 2 Ray Train workers streaming the shards -> sweep GA and RPD
fine-tuning over label fractions, from scratch and from the pretrained weights, with several seeds ->
report (table + figures). Settings are sized for a 2-core CPU (the full demo in under 10 minutes);
``quick`` is a smoke-sized variant for the test suite.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from octssl.config.job import parse_config
from octssl.config.sweep import parse_sweep_config
from octssl.demo.closeloop import close_loop as predict_and_grow
from octssl.errors import ConfigError, ShardError
from octssl.train.summary import RunSummary
from octssl.tune.report import rich_tables
from octssl.vocab import FAF, GA, RPD
from octssl.webds.export import export_shards
from octssl.webds.verify import verify_shards

MARKER = "demo.json"  # marks a directory this command wrote (and may therefore replace)


@dataclass(frozen=True)
class DemoSettings:
    volumes: int
    grid: tuple[int, int, int]
    labelled: float
    width: float
    crop: tuple[int, int]  # (nB, W) training crop for pretraining and fine-tuning
    pretrain_steps: int
    pretrain_batch: int
    tasks: tuple[str, ...]
    fractions: dict[str, tuple[float, ...]]  # per task
    seeds: tuple[int, ...]
    num_samples: int
    steps: tuple[int, ...]
    eval_every: int
    lr: tuple[float, float]
    first_point: dict[str, float] = field(default_factory=dict)
    batch_size: int = 2  # fine-tuning; more updates for the same crops converged faster here
    crops_per_volume: int = 8
    val_volumes: int | None = None


FULL = DemoSettings(
    volumes=200, grid=(16, 64, 64), labelled=1.0, width=0.25, crop=(16, 32), pretrain_steps=300, pretrain_batch=4,
    tasks=(GA, RPD), fractions={GA: (0.05, 0.2, 1.0), RPD: (0.2, 1.0)}, seeds=(0, 1), num_samples=1,
    steps=(200,), eval_every=100, lr=(3e-3, 3e-2), first_point={"lr": 0.01, "weight_decay": 1e-4, "steps": 200},
    val_volumes=20,
)
QUICK = DemoSettings(
    volumes=24, grid=(16, 64, 64), labelled=1.0, width=0.25, crop=(16, 32), pretrain_steps=6, pretrain_batch=2,
    tasks=(GA,), fractions={GA: (1.0,)}, seeds=(0,), num_samples=1, steps=(6,), eval_every=3, lr=(1e-3, 1e-2),
    first_point={"lr": 0.005, "weight_decay": 1e-4, "steps": 6}, crops_per_volume=2, val_volumes=4,
)


def prepare_out(out: Path) -> None:
    """Create ``out``; a directory holding an earlier demo is replaced, any other non-empty one refused."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise ConfigError(f"{out} exists and was not written by `octssl demo`: choose another --out")
        shutil.rmtree(out)  # a previous demo of ours: start afresh
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"status": "running", "started": time.time()}))


def pretrain_line(summary: RunSummary, weights: Path) -> str:
    """What the demo says after pretraining (no validation ran when ``best_metric`` is None)."""
    best = summary.best_metric
    score = f"val SSIM {best:.3f} (best)" if best is not None else "no validation score"
    return f"{score}, weights {weights}"


def pretrain_job(out: Path, s: DemoSettings, target: str = FAF) -> dict[str, Any]:
    return {
        "kind": "pretrain",
        "data": {"corpus": str(out / "corpus"), "shards": str(out / "shards"), "source": "stream",
                 "crop": list(s.crop), "batch_size": s.pretrain_batch, "val_volumes": 8},
        "model": {"name": "fpn", "width": s.width},
        "objective": {"kind": "reconstruction", "target": target},
        "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 1e-4, "warmup_steps": min(10, s.pretrain_steps // 4)},
        "deepspeed": {"zero_stage": 1},
        "run": {"max_steps": s.pretrain_steps, "log_every": 5, "eval_every": max(1, s.pretrain_steps // 2),
                "ckpt_every": max(1, s.pretrain_steps // 2), "storage_path": str(out / "runs"),
                "name": f"pretrain-{target}", "seed": 1234},
        "scaling": {"workers": 2, "cpus_per_worker": 1},
    }


def sweep_config(out: Path, s: DemoSettings, inits: dict[str, str]) -> dict[str, Any]:
    return {
        "kind": "sweep", "corpus": str(out / "corpus"), "storage_path": str(out), "name": "sweep",
        "tasks": list(s.tasks), "fractions": [1.0], "task_fractions": {t: list(f) for t, f in s.fractions.items()},
        "inits": inits, "models": ["fpn"],
        "seeds": list(s.seeds),
        "search": {"num_samples": s.num_samples, "steps": list(s.steps), "grace_steps": s.eval_every,
                   "lr": list(s.lr), "points": [s.first_point] if s.first_point else []},
        "resources": {"cpus_per_trial": 1},
        "job": {
            "data": {"crop": list(s.crop), "batch_size": s.batch_size, "crops_per_volume": s.crops_per_volume,
                     "val_volumes": s.val_volumes},
            "model": {"width": s.width},
            "optim": {"name": "adamw", "warmup_steps": 5, "schedule": "cosine"},
            "deepspeed": {"zero_stage": 0},
            "run": {"eval_every": s.eval_every, "log_every": 10},
        },
        "figure_volumes": 3,
    }


def run_demo(out: str | Path = "runs/demo", *, quick: bool = False, progress: bool = True,
             console: Console | None = None, close_loop: bool = True) -> dict[str, Any]:
    """Run every stage into ``out``; returns {settings, timings_s, paths, summary} (summary: the sweep's
    :class:`~octssl.tune.results.SweepSummary`; demo.json holds the rest). ``close_loop``: the corpus
    grows GA at known rates, and a last stage predicts the test split with the sweep's GA bundle, measures
    growth and adds both to report.md (:mod:`octssl.demo.closeloop`)."""
    import ray

    from octssl.corpus.synth import synthesize
    from octssl.train.launch import run
    from octssl.tune.sweep import run_sweep

    console = console or Console(stderr=True)
    s = QUICK if quick else FULL
    out = Path(out).expanduser().resolve()
    prepare_out(out)
    started_ray = not ray.is_initialized()
    timings: dict[str, float] = {}
    t_all = time.time()
    try:
        console.rule(f"[bold]1/5 synthesise {s.volumes} volumes of {'x'.join(map(str, s.grid))}")
        t0 = time.time()
        corpus = synthesize(out / "corpus", volumes=s.volumes, grid=s.grid, seed=0, labelled=s.labelled,
                            preview=not quick, progress=progress, ga_growth=close_loop)
        info = corpus.summary()
        console.print(f"{info['volumes']} volumes, {info['patients']} patients, splits {info['splits']}, "
                      f"labelled train patients {info['labels_train_patients']}")
        timings["synth"] = time.time() - t0

        console.rule("[bold]2/5 export WebDataset shards and verify them")
        t0 = time.time()
        index = export_shards(out / "corpus", out / "shards", samples_per_shard=32, progress=progress)
        problems = verify_shards(out / "shards", progress=progress)
        if problems:
            raise ShardError(f"{out / 'shards'}: verification failed: {problems[:3]}")
        console.print(f"{index['total']} samples in {len(index['shards'])} shards, checksums verified")
        timings["shards"] = time.time() - t0

        console.rule(f"[bold]3/5 pretrain: OCT -> inverted FAF, 2 Ray Train workers, {s.pretrain_steps} steps")
        t0 = time.time()
        pre = run(parse_config(pretrain_job(out, s), "demo pretrain"), progress=progress)
        weights = Path(pre.best_weights or pre.weights or "")
        console.print(pretrain_line(pre, weights))
        timings["pretrain"] = time.time() - t0

        fractions = "; ".join(f"{t} at {', '.join(f'{f:g}' for f in s.fractions[t])}" for t in s.tasks)
        console.rule(f"[bold]4/5 sweep: {fractions} x (scratch, ssl-faf) x seeds {list(s.seeds)}")
        t0 = time.time()
        config = parse_sweep_config(sweep_config(out, s, {"scratch": "scratch", "ssl-faf": str(weights)}),
                                    "demo sweep")
        summary = run_sweep(config, progress=progress)
        sweep_dir = Path(summary.sweep_dir or out / "sweep")
        timings["sweep"] = time.time() - t0

        console.rule("[bold]5/5 report")
        for table in rich_tables(summary):
            console.print(table)
        if close_loop:
            console.rule("[bold]+ the GA bundle predicts the test split; GA growth on the predictions")
            t0 = time.time()
            loop = predict_and_grow(sweep_dir, out / "corpus", progress=progress)
            r = loop["pearson_r"]
            console.print(f"{loop['volumes']} test volumes, GA area Pearson r {'n/a' if r is None else f'{r:.3f}'}, "
                          f"{loop['growth']['eyes_fitted']} eyes with a growth rate")
            timings["loop"] = time.time() - t0
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()
    timings["total"] = time.time() - t_all
    paths = {"corpus": str(out / "corpus"), "shards": str(out / "shards"), "pretrain": str(weights.parent.parent),
             "sweep": str(sweep_dir), "report": str(sweep_dir / "report.md")}
    result = {"settings": asdict(s), "quick": quick, "timings_s": {k: round(v, 1) for k, v in timings.items()},
              "paths": paths, "pretrain": {"val_ssim": pre.best_metric, "steps": pre.steps}}
    (out / MARKER).write_text(json.dumps({**result, "status": "done"}, indent=2))
    console.print("files: " + ", ".join(f"{k} {v}" for k, v in paths.items()))
    console.print(f"[green]demo done[/] in {timings['total']:.0f} s: " +
                  ", ".join(f"{k} {v:.0f} s" for k, v in timings.items() if k != "total"))
    return {**result, "summary": summary}
