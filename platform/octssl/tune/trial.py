"""One sweep trial: the fine-tuning Trainer in the Tune actor's own process, reporting each evaluation.

A trial is one fine-tuning run with one worker. Starting a nested TorchTrainer per trial costs ~16 s of
worker start-up on a 2-core machine (and ``Tuner(TorchTrainer)`` fails under Ray Train V2), so the
trial runs the same :class:`~octssl.train.loop.Trainer` in-process at world size 1 (as
``run_single_process`` does) and hands every validation result to ``tune.report``, where ASHA can stop
it. Its run directory (metrics, val.jsonl, best/ weights) lies under ``SWEEP_DIR/trials/<trial>``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    """The Trainer with its reporting changed: each checkpoint step reports to Tune, with the best metric.

    Trials are never resumed (a failed trial is recorded and the sweep moves on), so they keep no
    resumable checkpoints (those would only cost time); the best weights are still exported.
    """

    keeps_checkpoints = False
    tracked = False  # with tracking on, the sweep's MLflowLoggerCallback records the trial as a child run

    def report(self, metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        self.ctx.report({**metrics, f"best_{self.objective.primary_metric}": self.state.best_metric}, None)


def run_trial(params: dict[str, Any], plan: TrialPlan) -> None:
    """The Tune function trainable: ``params`` = {group, trial, lr, weight_decay, steps}."""
    from ray import tune

    from octssl.config.job import dump_config
    from octssl.train.loop import WorkerContext

    _prepare_process(plan)
    group = plan.group(params["group"])
    job = trial_job(plan.config, group, params, params["trial"], storage_path=plan.trials_dir)
    run_dir = Path(job.run_dir)
    run_dir.mkdir(parents=True, exist_ok=False)
    (run_dir / "config.yaml").write_text(dump_config(job))

    def report(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        tune.report({k: float(v) for k, v in metrics.items() if v is not None})

    TrialTrainer(job, WorkerContext(rank=0, world_size=1, run_dir=run_dir, report=report)).train()


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
