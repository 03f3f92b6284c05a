"""train_loop_per_worker: the ONE loop for pretraining and fine-tuning (Ray stays at the edges).

:class:`Trainer` reads as the story of a run: ``setup`` (data, model, engine), ``batches`` (a resumable
stream of batches), ``train_step``, ``validate``, ``save``/``restore`` and ``train``. Ray appears only in
:func:`train_loop_per_worker`, which hands the Trainer a :class:`WorkerContext` (rank, report, the
checkpoint to resume from); :func:`octssl.train.launch.run_single_process` drives the same Trainer
without Ray (benchmarks, GPU checks).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from octssl.config import JobConfig, parse_config
from octssl.data import plan as batching
from octssl.errors import OctsslError
from octssl.objectives import per_volume_at_original
from octssl.train import checkpoint as ckpt
from octssl.train.board import Board, reconstructions
from octssl.train.engine import build_engine, resolve_precision
from octssl.train.runlog import RunLog

FAULT_NAN_STEPS = "OCTSSL_FAULT_NAN_STEPS"  # testing hook: comma-separated steps whose loss is made NaN
_BOARD_SCALARS = ("loss", "lr", "samples_per_s", "data_wait_s", "step_s", "grad_norm")  # metrics.jsonl -> TensorBoard


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


class Trainer:
    """One rank's training run; its state (step, data position, RNG) is saved with the weights."""

    def __init__(self, config: JobConfig, ctx: WorkerContext) -> None:
        self.config, self.ctx = config, ctx
        self.run_dir = ctx.run_dir
        self.step = 0  # optimiser steps taken (skipped non-finite steps count: they consume data)
        self.epoch = 0
        self.step_in_epoch = 0
        self.skipped = 0
        self.bad_in_row = 0
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.best_metric: float | None = None
        self.last_val: dict[str, float] = {}
        self.started = time.time()
        self._nan_steps = {int(s) for s in os.environ.get(FAULT_NAN_STEPS, "").split(",") if s.strip()}

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        from octssl.data.sources import ZarrSource
        from octssl.data.transforms import EvalTransform, TrainTransform, collate
        from octssl.models import build_model
        from octssl.monitor import TrainMetrics, serve
        from octssl.objectives import build_objective

        c = self.config
        torch.manual_seed(c.run.seed + self.ctx.rank)
        np.random.seed((c.run.seed + self.ctx.rank) % 2**32)
        random.seed(c.run.seed + self.ctx.rank)
        self.precision = resolve_precision(c.deepspeed.precision)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.precision.channels_last else None
        self.objective = build_objective(c.objective.kind, target=c.objective.target, l1_weight=c.objective.l1_weight)
        target = c.objective.target
        segmentation = c.objective.kind == "segmentation"
        self.collate = collate
        augment = c.data.augment
        transform = TrainTransform(
            crop=tuple(c.data.crop), targets=(target,), seed=c.run.seed, flips=augment, rot180=augment,
            intensity=augment,
        )
        if c.data.source == "zarr":
            self.train_source = ZarrSource(
                c.data.corpus,
                split="train",
                label=target if segmentation else None,
                label_fraction=c.objective.label_fraction if segmentation else None,
                require=("oct", target),
                transform=transform,
                repeats=c.data.crops_per_volume,
            )
        else:
            from octssl.data.sources import StreamSource

            self.stream = StreamSource(
                c.data.shards, split="train", rank=self.ctx.rank, world_size=self.ctx.world_size,
                seed=c.run.seed, batch_size=c.data.batch_size, transform=transform,
            )
        self.val_source = None
        if c.data.corpus:
            self.val_source = ZarrSource(
                c.data.corpus, split="val", require=("oct", target), transform=EvalTransform(targets=(target,))
            )
        if c.data.source == "zarr":
            corpus = self.train_source.corpus
            self.grids = sorted({corpus.row(i)["grid"] for i in self.train_source.ids})
        else:
            self.grids = sorted({e.get("grid") for e in self.stream.entries.values() if e.get("grid")})
        self.model_options = {"width": c.model.width, "checkpointing": c.model.checkpointing, "out_channels": 1}
        model = build_model(c.model.name, **self.model_options)
        if c.run.init != "scratch":
            from octssl.models.transfer import load_weights

            load_weights(model, c.run.init, scope=c.run.init_scope)
        self.total_steps = self._total_steps()
        self.engine, self.scheduler = build_engine(model, c, self.total_steps, self.precision)
        self.metrics = TrainMetrics(rank=self.ctx.rank, run=c.run.name or "run")
        self.board = Board(self.run_dir, enabled=self.ctx.rank == 0)
        self.log = RunLog(self.run_dir, self.ctx.rank)
        if self.ctx.metrics_port:
            serve(self.ctx.metrics_port + self.ctx.local_rank)

    def _total_steps(self) -> int:
        c = self.config
        if c.run.max_steps is not None:
            return c.run.max_steps
        return c.run.epochs * self.steps_per_epoch()

    def steps_per_epoch(self) -> int:
        c = self.config
        if c.data.source == "zarr":
            return batching.steps_per_epoch(len(self.train_source), self.ctx.world_size, c.data.batch_size)
        return self.stream.batches_per_epoch

    # ---------------------------------------------------------------- data
    def batches(self) -> Iterator[dict[str, Any]]:
        """Endless batches from the saved position: (epoch, step_in_epoch) advance as they are consumed."""
        c = self.config
        while True:
            if c.data.source == "zarr":
                epoch_iter = batching.zarr_epoch(
                    self.train_source,
                    self.collate,
                    batch_size=c.data.batch_size,
                    seed=c.run.seed,
                    epoch=self.epoch,
                    start_step=self.step_in_epoch,
                    rank=self.ctx.rank,
                    world_size=self.ctx.world_size,
                    loader_workers=c.data.loader_workers,
                )
            else:
                self.stream.load_state_dict({"epoch": self.epoch, "step": self.step_in_epoch})
                epoch_iter = iter(self.stream.loader(num_workers=c.data.loader_workers, collate_fn=self.collate))
            yield from epoch_iter
            self.epoch += 1
            self.step_in_epoch = 0

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = dict(batch)
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                if self.device is not None:
                    value = value.to(self.device, non_blocking=True)
                if key == "oct" and self.precision.channels_last:
                    value = value.contiguous(memory_format=torch.channels_last_3d)
                out[key] = value
        return out

    # ---------------------------------------------------------------- steps
    def train_step(self, batch: dict[str, Any]) -> float | None:
        """One optimiser step; returns the loss, or None when a non-finite loss made every rank skip it."""
        logits = self.engine(batch["oct"])
        loss = self.objective.loss(logits.float(), batch)
        if self.step + 1 in self._nan_steps:
            loss = loss * float("nan")
        self.local_done = time.time()  # the step's first collective follows: ranks wait for each other there
        bad = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0], device=loss.device)
        if self.ctx.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() > 0:
            self.engine.zero_grad()
            return None
        self.engine.backward(loss)
        self.engine.step()
        return float(loss.detach())

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss and the objective's metrics on the val split, volumes sharded over ranks."""
        if self.val_source is None or len(self.val_source) == 0:
            return {}
        self.engine.eval()
        n = len(self.val_source)
        if self.config.data.val_volumes:
            n = min(n, self.config.data.val_volumes)
        rows: list[dict[str, float]] = []
        # Every rank runs the same number of forwards (ZeRO-3 all-gathers parameters in each one):
        # ranks past the end repeat volume 0 and drop its result.
        per_rank = -(-n // self.ctx.world_size)
        for k in range(per_rank):
            i = self.ctx.rank + k * self.ctx.world_size
            batch = self.to_device(self.collate([self.val_source[i if i < n else 0]]))
            logits = self.engine(batch["oct"]).float()
            if i >= n:
                continue
            loss = float(self.objective.loss(logits, batch))
            for row in per_volume_at_original(self.objective, logits, batch):
                rows.append({"val_loss": loss, **{k2: float(v) for k2, v in row.items() if _is_number(v)}})
        self.engine.train()
        if self.ctx.world_size > 1:
            gathered: list[Any] = [None] * self.ctx.world_size
            dist.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        keys = sorted({k for r in rows for k in r})
        return {k: float(np.nanmean([r.get(k, np.nan) for r in rows])) for k in keys}

    @property
    def val_key(self) -> str:
        return "ssim" if self.config.objective.kind == "reconstruction" else "dice"

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "skipped": self.skipped,
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
            "best_metric": self.best_metric,
            "world_size": self.ctx.world_size,
        }

    def restore(self, ckpt_dir: Path) -> None:
        self.engine.load_checkpoint(str(ckpt_dir), tag=ckpt.TAG)
        state = ckpt.load_trainer_state(ckpt_dir, self.ctx.rank)
        for key in ("step", "epoch", "step_in_epoch", "skipped", "first_loss", "last_loss", "best_metric"):
            setattr(self, key, state.get(key))
        self.log.rewind(self.step)
        self.metrics.restart()

    def save(self, metrics: dict[str, Any]) -> None:
        """Checkpoint on every rank and report it (the same number of reports on every rank)."""
        t0 = time.time()
        tmp = Path(tempfile.mkdtemp(prefix=f"octssl-ckpt-r{self.ctx.rank}-"))
        try:
            self.engine.save_checkpoint(str(tmp), tag=ckpt.TAG)
            ckpt.save_trainer_state(tmp, self.ctx.rank, self.state_dict())
            self.metrics.checkpoint(time.time() - t0)
            self.ctx.report(metrics, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def export(self, name: str) -> Path | None:
        c = self.config
        card = {
            "objective": c.objective.model_dump(),
            "normalisation": "z-score per B-scan (float32)",
            "crop": list(c.data.crop),
            "grid": self.grids,
            "summary": {"step": self.step, "best_metric": self.best_metric, self.val_key: self.last_val.get(self.val_key)},
        }
        return ckpt.export_weights(self.engine, self.run_dir / name, card)

    # ---------------------------------------------------------------- the run
    def train(self) -> dict[str, Any]:
        c = self.config
        self.setup()
        if self.ctx.resume_from is not None:
            self.restore(self.ctx.resume_from)
        stream = self.batches()
        window_n, window_steps, window_wait, window_time = 0, 0, 0.0, 0.0
        while self.step < self.total_steps:
            t0 = time.time()
            batch = self.to_device(next(stream))
            wait = time.time() - t0
            loss = self.train_step(batch)
            self.metrics.observe_step(seconds=time.time() - t0, local_s=self.local_done - t0, data_wait_s=wait,
                                      samples=len(batch["id"]))
            self.step += 1
            self.step_in_epoch += 1
            self.log.step(self.step, self.epoch, list(batch["id"]))
            if loss is None:
                self.skipped += 1
                self.bad_in_row += 1
                self.metrics.skipped_step()
                if self.bad_in_row >= c.run.max_bad_steps:
                    raise NonFiniteLossError(
                        f"{self.run_dir}: {self.bad_in_row} consecutive non-finite losses at step {self.step}: "
                        "lower optim.lr, enable optim.grad_clip, or check the data"
                    )
            else:
                self.bad_in_row = 0
                self.first_loss = loss if self.first_loss is None else self.first_loss
                self.last_loss = loss
            # Means over the steps since the last log; evaluation and checkpoint time is not step time.
            window_n += len(batch["id"])
            window_steps += 1
            window_wait += wait
            window_time += time.time() - t0
            if self.step % c.run.log_every == 0 or self.step == self.total_steps:
                self._log(window_n / max(window_time, 1e-9), window_time / window_steps,
                          window_wait / window_steps)
                window_n, window_steps, window_wait, window_time = 0, 0, 0.0, 0.0
            if self.step % c.run.eval_every == 0 or self.step == self.total_steps:
                self._evaluate()
            if self.step % c.run.ckpt_every == 0 or self.step == self.total_steps:
                self.save({"step": self.step, "loss": self.last_loss, **self.last_val})
        return self.finish()

    def _log(self, samples_per_s: float, step_s: float, wait: float) -> None:
        """Record the means over the steps since the last log (per rank, and rank 0's metrics.jsonl)."""
        from octssl.monitor import memory_now

        lr = float(self.scheduler.get_last_lr()[0])
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        memory, capacity = memory_now(self.device)
        self.metrics.update(step=self.step, total_steps=self.total_steps, checkpoint_every=self.config.run.ckpt_every,
                            loss=self.last_loss, lr=lr, grad_norm=grad_norm, memory=memory, device_capacity=capacity)
        record = {
            "step": self.step, "epoch": self.epoch, "loss": self.last_loss, "lr": lr,
            "samples_per_s": samples_per_s * self.ctx.world_size, "data_wait_s": wait, "step_s": step_s,
            "grad_norm": grad_norm, "skipped": self.skipped, "total_steps": self.total_steps,
            "time": time.time(),
        }
        self.log.log(record)
        self.board.scalars(self.step, "train", {k: record[k] for k in _BOARD_SCALARS})

    def _evaluate(self) -> None:
        self.last_val = self.validate()
        value = self.last_val.get(self.val_key)
        improved = value is not None and not math.isnan(value) and (
            self.best_metric is None or value > self.best_metric
        )
        if improved:
            self.best_metric = value
            self.export("best")  # collective under ZeRO-3: every rank takes the same branch
        if self.last_val:
            self.log.validation({"step": self.step, **self.last_val})
            self.metrics.validation(self.last_val)
            self.board.scalars(self.step, "val", self.last_val)
        self.board.images(self.step, reconstructions(self))

    def finish(self) -> dict[str, Any]:
        weights = self.export("final")
        summary = {
            "steps": self.step,
            "skipped_steps": self.skipped,
            "first_loss": self.first_loss,
            "final_loss": self.last_loss,
            "best_metric": self.best_metric,
            "best_metric_name": self.val_key,
            "val": self.last_val,
            "weights": str(weights) if weights else None,
            "best_weights": str(self.run_dir / "best" / "model.safetensors") if self.best_metric is not None else None,
            "wall_s": time.time() - self.started,
            "world_size": self.ctx.world_size,
        }
        if self.ctx.rank == 0:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The function Ray Train runs on every worker: config is ``{"job": JobConfig dict, "run_dir": str}``."""
    import ray.train
    from ray.train import Checkpoint

    job = parse_config(config["job"])
    rctx = ray.train.get_context()

    def report(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        clean = {k: v for k, v in metrics.items() if v is not None}
        ray.train.report(clean, checkpoint=Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir else None)

    checkpoint = ray.train.get_checkpoint()
    ctx = WorkerContext(
        rank=rctx.get_world_rank(),
        world_size=rctx.get_world_size(),
        local_rank=rctx.get_local_rank(),
        run_dir=Path(config["run_dir"]),
        report=report,
        metrics_port=config.get("metrics_port"),
    )
    trainer = Trainer(job, ctx)
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            ctx.resume_from = Path(path)
            trainer.train()
    else:
        trainer.train()
