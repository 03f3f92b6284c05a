"""The Trainer's recorder: which sinks a rank reports to (Prometheus, TensorBoard, the run log, MLflow).

Built once per rank by :func:`build_recorder`; the loop then reports each event once to the
:class:`~octssl.observe.recorder.Recorder` (see :mod:`octssl.observe.recorder` for the events). Every rank
records its own Prometheus series and its sample audit and heartbeat; only rank 0 writes TensorBoard,
metrics.jsonl/val.jsonl and, when tracking is on, the MLflow run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from octssl.config.job import JobConfig
from octssl.observe.metrics import TrainMetrics
from octssl.observe.recorder import ImagePair, PrometheusSink, Recorder, Sink, StepTiming
from octssl.observe.tracking import MlflowSink, tracking_uri
from octssl.train.board import Board
from octssl.train.runlog import RunLog

#: metrics.jsonl keys shown in TensorBoard as train/<key>
BOARD_SCALARS = ("loss", "lr", "samples_per_s", "data_wait_s", "step_s", "grad_norm")


class BoardSink(Sink):
    """TensorBoard: train/ scalars at log steps, val/ scalars and reconstructions at evaluations."""

    def __init__(self, board: Board) -> None:
        self.board = board

    def log(self, record: Mapping[str, Any]) -> None:
        self.board.scalars(record["step"], "train", {k: record[k] for k in BOARD_SCALARS})

    def validation(self, step: int, values: Mapping[str, float]) -> None:
        self.board.scalars(step, "val", values)

    def images(self, step: int, pairs: Sequence[ImagePair]) -> None:
        self.board.images(step, list(pairs))


class RunLogSink(Sink):
    """The run's own files: metrics.jsonl, val.jsonl, the sample audit and the heartbeat."""

    def __init__(self, log: RunLog) -> None:
        self.runlog = log

    def step(self, step: int, epoch: int, ids: Sequence[str], timing: StepTiming) -> None:
        self.runlog.step(step, epoch, list(ids))

    def log(self, record: Mapping[str, Any]) -> None:
        self.runlog.log(dict(record))

    def validation(self, step: int, values: Mapping[str, float]) -> None:
        self.runlog.validation({"step": step, **values})

    def resumed(self, step: int, *, after_failure: bool) -> None:
        self.runlog.rewind(step)


def build_recorder(config: JobConfig, run_dir: Path, rank: int, *, total_steps: int, device: Any = None,
                   tracked: bool = True) -> Recorder:
    """The sinks of one rank. ``tracked=False`` leaves MLflow out even when a tracking URI is set (a
    sweep trial: the sweep's Tune callback records it as a child run)."""
    metrics = TrainMetrics(rank=rank, run=config.run.name or "run")
    sinks: list[Sink] = [
        PrometheusSink(metrics, total_steps=total_steps, checkpoint_every=config.run.ckpt_every, device=device),
        BoardSink(Board(run_dir, enabled=rank == 0)),
        RunLogSink(RunLog(run_dir, rank)),
    ]
    uri = tracking_uri(config.tracking.uri)
    if tracked and uri and rank == 0:
        sinks.append(MlflowSink.for_run(uri, config, run_dir))
    return Recorder(sinks)
