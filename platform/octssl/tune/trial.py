"""One sweep trial: the fine-tuning Trainer in the Tune actor's own process, reporting each evaluation.

A trial is one fine-tuning run with one worker. Starting a nested TorchTrainer per trial costs ~16 s of
worker start-up on a 2-core machine (and ``Tuner(TorchTrainer)`` fails under Ray Train V2), so the
trial runs the same :class:`~octssl.train.loop.Trainer` in-process at world size 1 (as
``run_single_process`` does) and hands every validation result to ``tune.report``, where ASHA can stop
it. Its run directory (metrics, val.jsonl, best/ weights) lies under ``SWEEP_DIR/trials/<trial>``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from octssl.config.job import dump_config
from octssl.config.sweep import Group, SweepConfig, trial_job
from octssl.train.loop import Trainer

#: driver environment forwarded to trials (testing and drill hooks of the train loop)
FORWARDED_ENV = ("OCTSSL_FAULT_NAN_STEPS",)


@dataclass
class TrialPlan:
    """What every trial needs from the driver (shipped once through Ray's object store)."""

    config: SweepConfig
    trials_dir: str
    env: dict[str, str] = field(default_factory=dict)

    def group(self, key: str) -> Group:
        for group in self.config.groups:
            if group.key == key:
                return group
        raise KeyError(key)


class TrialTrainer(Trainer):
    """The Trainer with its reporting changed: each checkpoint step reports to Tune, with the best metric,
    and hands Tune the checkpoint a resumed sweep continues an unfinished trial from (Tune keeps the last).
    A trial does not stop on a preemption request: it would look finished to Tune. A preempted sweep
    resumes its trials from their last evaluation's checkpoint instead."""

    preemptible = False
    tracked = False  # with tracking on, the sweep's MLflowLoggerCallback records the trial as a child run

    def report(self, metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        self.ctx.report({**metrics, f"best_{self.objective.primary_metric}": self.state.best_metric}, ckpt_dir)


def run_trial(params: dict[str, Any], plan: TrialPlan) -> None:
    """The Tune function trainable: ``params`` = {group, trial, lr, weight_decay, steps}.

    In a resumed sweep Tune hands an unfinished trial its last checkpoint, and the trial continues from it.
    A trial that had finished (its summary.json written) but that Tune's last experiment checkpoint still
    saw running only reports its last result again: a finished trial never trains twice. One killed
    before its first checkpoint starts again from an empty run directory."""
    from ray import tune
    from ray.tune import Checkpoint

    from octssl.train.loop import WorkerContext

    group = plan.group(params["group"])
    job = trial_job(plan.config, group, params, params["trial"], storage_path=plan.trials_dir)
    run_dir = Path(job.run_dir)
    if (run_dir / "summary.json").is_file():
        tune.report(_last_result(run_dir))
        return
    checkpoint = tune.get_checkpoint()
    if checkpoint is None and run_dir.exists():
        shutil.rmtree(run_dir)
    _prepare_process(plan)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(job))

    def report(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        tune.report(clean, checkpoint=Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir else None)

    ctx = WorkerContext(rank=0, world_size=1, run_dir=run_dir, report=report)
    if checkpoint is None:
        TrialTrainer(job, ctx).train()
        return
    with checkpoint.as_directory() as path:
        ctx.resume_from = Path(path)
        TrialTrainer(job, ctx).train()


def _last_result(run_dir: Path) -> dict[str, float]:
    """What a finished trial last reported: its summary's step and its last validation record."""
    summary = json.loads((run_dir / "summary.json").read_text())
    vals = [json.loads(line) for line in (run_dir / "val.jsonl").read_text().splitlines() if line.strip()] \
        if (run_dir / "val.jsonl").is_file() else []
    last = vals[-1] if vals else {}
    return {k: float(v) for k, v in {**last, "step": summary["steps"]}.items()
            if isinstance(v, (int, float)) and v is not None}


def _prepare_process(plan: TrialPlan) -> None:
    """Per-trial process state: threads, accelerator, forwarded env, a world-size-1 process group."""
    import torch

    from octssl.train.engine import init_single_process_group

    resources = plan.config.resources
    gpu = resources.gpus_per_trial > 0
    if not gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    for key in FORWARDED_ENV:
        if key in plan.env:
            os.environ[key] = plan.env[key]
        else:
            os.environ.pop(key, None)
    # An ASHA-stopped trial's thread only exits at its next report; Tune waits 2 s by default before it
    # gives up reusing the actor and starts a fresh one (~7 s of imports here). Wait for the report instead.
    os.environ["TUNE_FUNCTION_THREAD_TIMEOUT_S"] = "600"
    # More threads than CPUs granted oversubscribes a shared machine (measured: 0.33 s vs ~2 s per step).
    torch.set_num_threads(max(1, int(resources.cpus_per_trial)))
    init_single_process_group()
