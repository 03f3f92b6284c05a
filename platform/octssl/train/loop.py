"""train_loop_per_worker: the ONE loop for pretraining and fine-tuning (Ray stays at the edges).

:class:`Trainer` reads as the story of a run: ``setup`` (the training data from
:func:`octssl.data.feed.build_train_data`, model, engine), ``train_step``, ``validate``, ``checkpoint``
(``saved_checkpoint`` then ``report``), ``restore`` and ``train``. Its resumable state is one
:class:`~octssl.train.state.RunState`, saved and restored by :mod:`octssl.train.checkpoint`. Ray appears only in
:func:`train_loop_per_worker`, which hands the Trainer a :class:`WorkerContext` (rank, report, the
checkpoint to resume from); :func:`octssl.train.launch.run_single_process` drives the same Trainer
without Ray (benchmarks, GPU checks).
"""

from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from octssl.apply.metrics import average
from octssl.apply.predictor import Predictor
from octssl.config.job import JobConfig, parse_config
from octssl.data.transforms import collate
from octssl.errors import OctsslError
from octssl.models.precision import resolve_precision
from octssl.observe.metrics import serve
from octssl.observe.recorder import StepTiming
from octssl.storage.location import Location, upload_tree
from octssl.train import checkpoint as ckpt
from octssl.train import preempt
from octssl.train.board import reconstructions
from octssl.train.components import build_components
from octssl.train.engine import build_engine
from octssl.train.objectives import per_volume_at_original
from octssl.train.preempt import Poll
from octssl.train.recorder import build_recorder
from octssl.train.state import Cadence, RunState
from octssl.train.summary import RunSummary
from octssl.vocab import THRESHOLD, VAL, VOLUME

FAULT_NAN_STEPS = "OCTSSL_FAULT_NAN_STEPS"  # testing hook: comma-separated steps whose loss is made NaN


class NonFiniteLossError(OctsslError):
    """Too many consecutive steps with a NaN/inf loss."""


@dataclass
class WorkerContext:
    """What a worker knows of its place in the job; Ray Train or the single-process driver fills it."""

    rank: int
    world_size: int
    run_dir: Path
    report: Callable[[dict[str, Any], Path | None], None]
    resume_from: Path | None = None  # a checkpoint directory
    metrics_port: int | None = None  # each worker serves /metrics on metrics_port + local_rank
    local_rank: int = 0
    restarted: bool = False  # resuming after a failure of this run (not a deliberate --resume)


class Trainer:
    """One rank's training run. Hooks a variant may override: ``report`` (what a checkpoint step tells the
    driver), ``preemptible`` (whether a stop request, :mod:`octssl.train.preempt`, makes it checkpoint
    and stop) and ``tracked`` (whether it keeps an MLflow run of its own when tracking is on).

    The loop reports what happens (steps, log steps, evaluations, checkpoints, resume, end) once, to
    ``self.recorder``, which fans it out to Prometheus, TensorBoard, the run log and MLflow."""

    preemptible = True
    tracked = True

    def __init__(self, config: JobConfig, ctx: WorkerContext) -> None:
        self.config, self.ctx = config, ctx
        self.run_dir = ctx.run_dir
        self.state = RunState(world_size=ctx.world_size)
        self.bad_in_row = 0
        self.last_val: dict[str, float] = {}
        self.started = time.time()
        self.stop_requested = False  # a preemption request seen by some rank at the last step
        self._stop_poll: Callable[[], bool] | None = None
        self._nan_steps = {int(s) for s in os.environ.get(FAULT_NAN_STEPS, "").split(",") if s.strip()}

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        from octssl.data.feed import build_train_data
        from octssl.data.sources import ZarrSource
        from octssl.data.transforms import EvalTransform

        c = self.config
        torch.manual_seed(c.run.seed + self.ctx.rank)
        np.random.seed((c.run.seed + self.ctx.rank) % 2**32)
        random.seed(c.run.seed + self.ctx.rank)
        self.precision = resolve_precision(c.deepspeed.precision)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.precision.channels_last else None
        target = c.objective.target
        self.data = build_train_data(c, self.ctx.rank, self.ctx.world_size)
        self.corpus_version = self.data.version
        self.val_source = None
        if c.data.corpus:
            self.val_source = ZarrSource(c.data.corpus, split=VAL, require=(VOLUME, target),
                                         transform=EvalTransform(targets=(target,)))
        components = build_components(c)  # after the data: the model's init draws from the seeded RNG
        self.objective = components.objective
        self.total_steps = c.run.total_steps(self.data.steps_per_epoch)
        self.cadence = Cadence(self.total_steps)
        self.engine, self.scheduler = build_engine(components.model, c, self.total_steps, self.precision)
        self.predictor = Predictor(self.engine, precision=self.precision, device=self.device)  # as `octssl predict`
        self.recorder = build_recorder(c, self.run_dir, self.ctx.rank, total_steps=self.total_steps,
                                       device=self.device, tracked=self.tracked)
        if self.ctx.metrics_port:
            serve(self.ctx.metrics_port + self.ctx.local_rank)
        if self.preemptible and self.ctx.rank == 0:  # rank 0 reads stop requests; the step's all-reduce tells the rest
            self._stop_poll = Poll(c.run.name or "run", since=self.started)

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = dict(batch)
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                if self.device is not None:
                    value = value.to(self.device, non_blocking=True)
                if key == VOLUME and self.precision.channels_last:
                    value = value.contiguous(memory_format=torch.channels_last_3d)
                out[key] = value
        return out

    # ---------------------------------------------------------------- steps
    def train_step(self, batch: dict[str, Any]) -> float | None:
        """One optimiser step; returns the loss, or None when a non-finite loss made every rank skip it
        (the LR schedule still advances, so it ends where it was planned to)."""
        logits = self.engine(batch[VOLUME])
        loss = self.objective.loss(logits.float(), batch)
        if self.state.step + 1 in self._nan_steps:
            loss = loss * float("nan")
        self.local_done = time.time()  # the step's first collective follows: ranks wait for each other there
        stop = 1.0 if self._stop_poll is not None and self._stop_poll() else 0.0
        bad = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0, stop], device=loss.device)
        if self.ctx.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.stop_requested = bad[1].item() > 0
        if bad[0].item() > 0:
            self.engine.zero_grad()
            self.scheduler.step()
            return None
        self.engine.backward(loss)
        self.engine.step()
        return float(loss.detach())

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss and the objective's metrics on the val split (volumes sharded over ranks): the forward of
        :class:`~octssl.apply.predictor.Predictor` and the metrics of :mod:`octssl.apply.metrics` (averaged by
        :func:`~octssl.apply.metrics.average`, which chooses the segmentation threshold by best pooled Dice),
        as for the sweep's test split and ``octssl predict``; undefined HD95s counted."""
        if self.val_source is None or len(self.val_source) == 0:
            return {}
        self.engine.eval()
        n = len(self.val_source)
        if self.config.data.val_volumes:
            n = min(n, self.config.data.val_volumes)
        rows: list[dict[str, Any]] = []
        # Every rank runs the same number of forwards (ZeRO-3 all-gathers parameters in each one):
        # ranks past the end repeat volume 0 and drop its result.
        per_rank = -(-n // self.ctx.world_size)
        for k in range(per_rank):
            i = self.ctx.rank + k * self.ctx.world_size
            batch = self.to_device(collate([self.val_source[i if i < n else 0]]))
            logits = self.predictor.logits(batch[VOLUME])
            if i >= n:
                continue
            volume_rows = per_volume_at_original(self.objective, logits, batch)
            loss = float(self.objective.loss(logits, batch))
            rows += [{"val_loss": loss, **row} for row in volume_rows]
        self.engine.train()
        self.val_volumes = n
        if self.ctx.world_size > 1:
            gathered: list[Any] = [None] * self.ctx.world_size
            dist.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        return average(rows)

    # ---------------------------------------------------------------- checkpoints
    def restore(self, ckpt_dir: Path, *, after_failure: bool = True) -> None:
        ckpt.load_checkpoint(self.engine, ckpt_dir)  # weights_only: a tampered checkpoint cannot run code
        self.state = ckpt.load_state(ckpt_dir, self.ctx.rank)
        self.state.world_size = self.ctx.world_size
        self.data.load_state_dict(self.state.data)
        self.recorder.resumed(self.state.step, after_failure=after_failure)

    @contextmanager
    def saved_checkpoint(self) -> Iterator[Path]:
        """Write this rank's checkpoint (DeepSpeed state + run state) to a temporary directory."""
        t0 = time.time()
        tmp = Path(tempfile.mkdtemp(prefix=f"octssl-ckpt-r{self.ctx.rank}-"))
        try:
            self.state.data = self.data.state_dict()
            self.engine.save_checkpoint(str(tmp), tag=ckpt.TAG)
            ckpt.save_state(tmp, self.ctx.rank, self.state)
            self.recorder.checkpoint(self.state.step, time.time() - t0)
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def report(self, metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        """Tell the driver about a checkpoint step (every rank, the same number of times)."""
        self.ctx.report(metrics, ckpt_dir)

    def checkpoint(self, metrics: dict[str, Any]) -> None:
        with self.saved_checkpoint() as path:
            self.report(metrics, path)

    def export(self, name: str) -> Path | Location | None:
        """Weights with their card; the card records the val evaluation behind them: its metrics, the
        number of val volumes and (segmentation) the ``threshold`` chosen there, which a bundle ships."""
        c = self.config
        key = self.objective.primary_metric
        card = {
            "objective": c.objective.model_dump(),
            "normalisation": "z-score per B-scan (float32)",
            "crop": list(c.data.crop),
            "grid": self.data.grids,
            "spacing_mm": self.data.spacing_range(), "corpus_version": self.corpus_version,
            "key_fingerprint": self.data.key_fingerprint,  # device files predicted later must use this key
            "training_data": self.data.training_data(),
            "summary": {"step": self.state.step, "best_metric": self.state.best_metric, key: self.last_val.get(key)},
            "val": self.last_val, "val_volumes": getattr(self, "val_volumes", 0),
            THRESHOLD: self.last_val.get(THRESHOLD),
        }
        return ckpt.export_weights(self.engine, self.run_dir / name, card)

    # ---------------------------------------------------------------- the run
    def train(self) -> RunSummary | None:
        c = self.config
        self.setup()
        if self.ctx.resume_from is not None:
            self.restore(self.ctx.resume_from, after_failure=self.ctx.restarted)
        batches = self.data.forever()
        window = _Window()
        while self.state.step < self.total_steps:
            t0 = time.time()
            batch = self.to_device(next(batches))
            wait = time.time() - t0
            loss = self.train_step(batch)
            timing = StepTiming(seconds=time.time() - t0, local_s=self.local_done - t0, data_wait_s=wait,
                                samples=len(batch["id"]))
            state = self.state
            state.step += 1
            self.recorder.step(state.step, self.data.epoch, list(batch["id"]), timing)
            self._count(loss)
            window.add(len(batch["id"]), wait, time.time() - t0)  # evaluation and checkpoints are not step time
            evaluated: dict[str, float] = {}
            if self.cadence.due(state.step, c.run.log_every):
                self._log(window)
                window = _Window()
            if self.cadence.due(state.step, c.run.eval_every):
                evaluated = self._evaluate()
            if self.cadence.due(state.step, c.run.ckpt_every):
                self.checkpoint({"step": state.step, "loss": state.last_loss, **evaluated})
            if self.stop_requested and state.step < self.total_steps:
                self.stop_preempted(checkpointed=self.cadence.due(state.step, c.run.ckpt_every))
                return None
        return self.finish()

    def stop_preempted(self, checkpointed: bool) -> None:
        """Checkpoint this step (unless the cadence just did) and stop without a summary (rank 0 writes
        ``preempted.json`` instead): a resumed run loses no step."""

        if not checkpointed:
            self.checkpoint({"step": self.state.step, "loss": self.state.last_loss})
        if self.ctx.rank == 0:
            preempt.write_marker(self.run_dir, self.state.step, preempt.asked_at(self.config.run.name or "run"))

    def _count(self, loss: float | None) -> None:
        state = self.state
        if loss is None:
            state.skipped += 1
            self.bad_in_row += 1
            self.recorder.skipped(state.step)
            if self.bad_in_row >= self.config.run.max_bad_steps:
                raise NonFiniteLossError(
                    f"{self.run_dir}: {self.bad_in_row} consecutive non-finite losses at step {state.step}: "
                    "lower optim.lr, enable optim.grad_clip, or check the data"
                )
            return
        self.bad_in_row = 0
        state.first_loss = loss if state.first_loss is None else state.first_loss
        state.last_loss = loss

    def _log(self, window: _Window) -> None:
        """Record the state at a log step (metrics.jsonl's line; every sink takes what it shows)."""
        samples_per_s, step_s, wait = window.means()
        lr = float(self.scheduler.get_last_lr()[0])
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        state = self.state
        record = {
            "step": state.step, "epoch": self.data.epoch, "loss": state.last_loss, "lr": lr,
            "samples_per_s": samples_per_s * self.ctx.world_size, "data_wait_s": wait, "step_s": step_s,
            "grad_norm": grad_norm, "skipped": state.skipped, "total_steps": self.total_steps,
            "time": time.time(),
        }
        self.recorder.log(record)

    def _evaluate(self) -> dict[str, float]:
        self.last_val = self.validate()
        value = self.last_val.get(self.objective.primary_metric)
        best = self.state.best_metric
        if value is not None and not math.isnan(value) and (best is None or value > best):
            self.state.best_metric, self.state.best_step, self.state.best_val = value, self.state.step, self.last_val
            self.export("best")  # collective under ZeRO-3: every rank takes the same branch
        if self.last_val:
            self.recorder.validation(self.state.step, self.last_val)
        self.recorder.images(self.state.step, reconstructions(self))
        return self.last_val

    def finish(self) -> RunSummary:
        weights = self.export("final")
        summary = RunSummary.of_run(
            self.state, metric=self.objective.primary_metric, val=self.last_val,
            weights=str(weights) if weights else None,
            best_weights=str(self.run_dir / "best" / "model.safetensors") if self.state.best_metric is not None else None,
            wall_s=time.time() - self.started, world_size=self.ctx.world_size, corpus_version=self.corpus_version)
        if self.ctx.rank == 0:
            summary.write(self.run_dir / "summary.json")
        self.recorder.finish(summary.model_dump(mode="json"))
        return summary


class _Window:
    """Samples, data-wait and step time since the last log."""

    def __init__(self) -> None:
        self.samples, self.steps, self.wait, self.time = 0, 0, 0.0, 0.0

    def add(self, samples: int, wait: float, seconds: float) -> None:
        self.samples += samples
        self.steps += 1
        self.wait += wait
        self.time += seconds

    def means(self) -> tuple[float, float, float]:
        """(samples/s, seconds per step, data-wait seconds per step)."""
        steps = max(self.steps, 1)
        return self.samples / max(self.time, 1e-9), self.time / steps, self.wait / steps


def _started_before(attempt: str, rank: int) -> bool:
    """Whether this rank already started in this launch (``attempt``: a token per ``fit``): then Ray is
    restarting it after a failure. A node-local marker file per (attempt, rank) remembers the first start."""
    if not attempt:
        return False
    marker = Path(tempfile.gettempdir()) / "octssl-attempts" / f"{attempt}-rank{rank}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        marker.touch(exist_ok=False)
    except FileExistsError:
        return True
    return False


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The function Ray Train runs on every worker: config is ``{"job": JobConfig dict, "run_dir": str,
    "metrics_port": int | None, "attempt": str, "remote_run_dir": str | None}``; with a remote run dir
    (an object-store URL) each worker uploads its local run dir there when it stops."""
    import ray.train
    from ray.train import Checkpoint

    job = parse_config(config["job"])
    rctx = ray.train.get_context()

    def report(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        clean = {k: v for k, v in metrics.items() if v is not None}
        ray.train.report(clean, checkpoint=Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir else None)

    checkpoint = ray.train.get_checkpoint()
    rank = rctx.get_world_rank()
    ctx = WorkerContext(
        rank=rank,
        world_size=rctx.get_world_size(),
        local_rank=rctx.get_local_rank(),
        run_dir=Path(config["run_dir"]),
        report=report,
        metrics_port=config.get("metrics_port"),
        restarted=_started_before(config.get("attempt", ""), rank),
    )
    trainer = Trainer(job, ctx)
    try:
        if checkpoint is not None:
            with checkpoint.as_directory() as path:
                ctx.resume_from = Path(path)
                trainer.train()
        else:
            trainer.train()
    finally:
        if config.get("remote_run_dir"):
            upload_tree(ctx.run_dir, config["remote_run_dir"])
