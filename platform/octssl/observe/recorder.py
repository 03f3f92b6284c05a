"""The one recorder a training loop reports to, fanning each event out to its sinks.

TorchTitan's ``MetricsProcessor`` is the model: the loop says once what happened (a step, a log step, an
evaluation, a checkpoint, a resume, the end) and every sink that cares records it its own way:
Prometheus (:class:`PrometheusSink`, here), TensorBoard and the run log (:mod:`octssl.train.recorder`) and,
when tracking is on, MLflow (:class:`octssl.observe.tracking.MlflowSink`). A sink overrides only the
events it records; the others are no-ops. Which sinks a rank gets is decided once, where the recorder is
built (:func:`octssl.train.recorder.build_recorder`), never at the call sites.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from octssl.observe.metrics import TrainMetrics, memory_now

#: (volume id, target en-face image, reconstruction), both (nB, W) in [0, 1]
ImagePair = tuple[str, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class StepTiming:
    """One optimiser step as the loop timed it."""

    seconds: float  # wall time, data wait and collectives included
    local_s: float  # before the step's first collective
    data_wait_s: float
    samples: int


class Sink:
    """Receives the loop's events; every method is a no-op unless a sink overrides it."""

    def step(self, step: int, epoch: int, ids: Sequence[str], timing: StepTiming) -> None:
        """Step ``step`` ended (counted from 1) having trained on the volumes ``ids``."""

    def skipped(self, step: int) -> None:
        """The step after ``step`` was skipped: its loss was not finite."""

    def log(self, record: Mapping[str, Any]) -> None:
        """A log step: ``record`` is the line metrics.jsonl gets (step, loss, lr, throughput, ...)."""

    def validation(self, step: int, values: Mapping[str, float]) -> None:
        """An evaluation at ``step`` gave ``values`` (name -> value; never empty)."""

    def images(self, step: int, pairs: Sequence[ImagePair]) -> None:
        """Reconstructions of a few val volumes at ``step``."""

    def checkpoint(self, step: int, seconds: float) -> None:
        """A checkpoint of ``step`` was saved in ``seconds``."""

    def resumed(self, step: int, *, after_failure: bool) -> None:
        """The run continues from the checkpoint of ``step`` (``after_failure``: not a deliberate --resume)."""

    def finish(self, summary: Mapping[str, Any]) -> None:
        """The run ended; ``summary`` is summary.json's content (written before this is called)."""


class Recorder(Sink):
    """Fans every event out to its sinks, in order."""

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks = list(sinks)

    def step(self, step: int, epoch: int, ids: Sequence[str], timing: StepTiming) -> None:
        for sink in self.sinks:
            sink.step(step, epoch, ids, timing)

    def skipped(self, step: int) -> None:
        for sink in self.sinks:
            sink.skipped(step)

    def log(self, record: Mapping[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(record)

    def validation(self, step: int, values: Mapping[str, float]) -> None:
        for sink in self.sinks:
            sink.validation(step, values)

    def images(self, step: int, pairs: Sequence[ImagePair]) -> None:
        for sink in self.sinks:
            sink.images(step, pairs)

    def checkpoint(self, step: int, seconds: float) -> None:
        for sink in self.sinks:
            sink.checkpoint(step, seconds)

    def resumed(self, step: int, *, after_failure: bool) -> None:
        for sink in self.sinks:
            sink.resumed(step, after_failure=after_failure)

    def finish(self, summary: Mapping[str, Any]) -> None:
        for sink in self.sinks:
            sink.finish(summary)


class PrometheusSink(Sink):
    """One rank's Prometheus series (:class:`~octssl.observe.metrics.TrainMetrics`); every rank has one.

    ``device`` is the rank's accelerator (None on CPU), sampled for memory at each log step.
    """

    def __init__(self, metrics: TrainMetrics, *, total_steps: int, checkpoint_every: int, device: Any = None) -> None:
        self.metrics = metrics
        self.total_steps, self.checkpoint_every, self.device = total_steps, checkpoint_every, device

    def step(self, step: int, epoch: int, ids: Sequence[str], timing: StepTiming) -> None:
        self.metrics.observe_step(seconds=timing.seconds, local_s=timing.local_s, data_wait_s=timing.data_wait_s,
                                  samples=timing.samples)

    def skipped(self, step: int) -> None:
        self.metrics.skipped_step()

    def log(self, record: Mapping[str, Any]) -> None:
        memory, capacity = memory_now(self.device)
        self.metrics.update(step=record["step"], total_steps=self.total_steps, checkpoint_every=self.checkpoint_every,
                            loss=record.get("loss"), lr=record.get("lr"), grad_norm=record.get("grad_norm"),
                            memory=memory, device_capacity=capacity)

    def validation(self, step: int, values: Mapping[str, float]) -> None:
        self.metrics.validation(values)

    def checkpoint(self, step: int, seconds: float) -> None:
        self.metrics.checkpoint(seconds)

    def resumed(self, step: int, *, after_failure: bool) -> None:
        self.metrics.restart(count=after_failure)
