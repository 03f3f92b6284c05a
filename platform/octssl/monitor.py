"""Prometheus metrics for training and sweeps: definitions, per-rank recorders and the /metrics exporter.

Every metric lives in one module-level registry, `REGISTRY` (the only global state the project allows),
and is named `octssl_*` with the labels `run` and `rank` (sweep metrics: `run` and `state`). A training
process records through `TrainMetrics(rank, run)` and exposes the registry with `serve(port)`.

Ports: one HTTP server per process. Under Ray Train every rank is its own process, so a run with several
ranks on one machine serves rank r on `port + r` (on Kubernetes each worker pod holds one rank and every
pod serves the same port, 9100 in k8s/). `serve` binds 127.0.0.1 unless told otherwise or unless the
environment variable `OCTSSL_METRICS_ADDR` names another address (k8s/ sets 0.0.0.0 so that the
PodMonitors reach it; the NetworkPolicy there limits who may).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, start_http_server

from octssl.errors import ConfigError

REGISTRY = CollectorRegistry(auto_describe=True)

_RANK = ("run", "rank")

SAMPLES_PER_SECOND = Gauge(
    "octssl_samples_per_second", "Training samples per second on this rank over the last logging interval",
    _RANK, registry=REGISTRY)
STEP_SECONDS = Gauge(
    "octssl_step_seconds", "Mean wall time of one optimizer step (data wait included) over the last interval",
    _RANK, registry=REGISTRY)
DATA_WAIT_SECONDS = Gauge(
    "octssl_data_wait_seconds", "Mean time per step spent waiting for the next batch over the last interval",
    _RANK, registry=REGISTRY)
LOSS = Gauge("octssl_loss", "Training loss at the last logged step", _RANK, registry=REGISTRY)
LEARNING_RATE = Gauge("octssl_learning_rate", "Learning rate at the last logged step", _RANK, registry=REGISTRY)
GRAD_NORM = Gauge("octssl_grad_norm", "Global gradient norm (before clipping) at the last logged step",
                  _RANK, registry=REGISTRY)
DEVICE_MEMORY_BYTES = Gauge(
    "octssl_device_memory_bytes", "Accelerator memory allocated by this rank (host RSS on CPU)",
    _RANK, registry=REGISTRY)
STEP = Gauge("octssl_step", "Optimizer step reached by this rank (restarts from the checkpoint's step)",
             _RANK, registry=REGISTRY)
CHECKPOINT_SECONDS = Gauge(
    "octssl_checkpoint_seconds", "Wall time of the last checkpoint save on this rank", _RANK, registry=REGISTRY)
STEPS = Counter("octssl_steps", "Optimizer steps taken by this process", _RANK, registry=REGISTRY)
SKIPPED_STEPS = Counter(
    "octssl_skipped_steps", "Steps skipped because the loss was not finite", _RANK,
    registry=REGISTRY)
CHECKPOINTS = Counter("octssl_checkpoints", "Checkpoints saved by this process", _RANK, registry=REGISTRY)
WORKER_RESTARTS = Counter(
    "octssl_worker_restarts", "Times this rank started again from a checkpoint after a failure", _RANK,
    registry=REGISTRY)
SWEEP_TRIALS = Gauge("octssl_sweep_trials", "Sweep trials by state (PENDING, RUNNING, TERMINATED, ERROR)",
                     ("run", "state"), registry=REGISTRY)

# The exporter's own state: the one HTTP server of this process, kept beside the registry it serves.
_SERVER: dict[str, object] = {}


class TrainMetrics:
    """Records one rank's training metrics under the labels (run, rank)."""

    def __init__(self, rank: int, run: str, *, start_step: int = 0) -> None:
        """`start_step`: the step a resumed run starts from, so `octssl_steps_total` counts only new steps."""
        self.rank = int(rank)
        self.run = str(run)
        self._labels = {"run": self.run, "rank": str(self.rank)}
        self._last_step = int(start_step)
        # Counters start at 0 so that increase()/rate() in the alert rules see their first increment.
        for counter in (STEPS, SKIPPED_STEPS, CHECKPOINTS, WORKER_RESTARTS):
            counter.labels(**self._labels)

    def update(self, *, step: int, loss: float | None = None, lr: float | None = None,
               samples_per_s: float | None = None, step_s: float | None = None,
               data_wait_s: float | None = None, grad_norm: float | None = None,
               memory_bytes: float | None = None) -> None:
        """Record the state at optimizer step `step`; values left None keep their last value."""
        labels = self._labels
        if step > self._last_step:
            STEPS.labels(**labels).inc(step - self._last_step)
        self._last_step = step
        STEP.labels(**labels).set(step)
        for gauge, value in ((LOSS, loss), (LEARNING_RATE, lr), (SAMPLES_PER_SECOND, samples_per_s),
                             (STEP_SECONDS, step_s), (DATA_WAIT_SECONDS, data_wait_s),
                             (GRAD_NORM, grad_norm), (DEVICE_MEMORY_BYTES, memory_bytes)):
            if value is not None:
                gauge.labels(**labels).set(float(value))

    def checkpoint(self, seconds: float) -> None:
        """Record one checkpoint save that took `seconds`."""
        CHECKPOINT_SECONDS.labels(**self._labels).set(float(seconds))
        CHECKPOINTS.labels(**self._labels).inc()

    def skipped_step(self) -> None:
        """Count one step skipped for a non-finite loss."""
        SKIPPED_STEPS.labels(**self._labels).inc()

    def restart(self, from_step: int | None = None, *, count: bool = True) -> None:
        """Note that this rank resumed from a checkpoint; ``count`` it as a restart after a failure (a
        deliberate ``--resume`` is not one). `from_step`, the checkpoint's step, keeps the resumed steps
        out of `octssl_steps_total`.
        """
        if count:
            WORKER_RESTARTS.labels(**self._labels).inc()
        if from_step is not None:
            self._last_step = int(from_step)

    def values(self) -> dict[str, float]:
        """This rank's current samples by metric name (tests and logs; NaN stays NaN)."""
        found: dict[str, float] = {}
        for family in REGISTRY.collect():
            for sample in family.samples:
                if sample.labels == self._labels and not sample.name.endswith("_created"):
                    found[sample.name] = sample.value
        return found


class SweepMetrics:
    """Records how many trials of one sweep are in each state."""

    def __init__(self, run: str) -> None:
        self.run = str(run)
        self._states: set[str] = set()

    def update(self, counts: Mapping[str, int]) -> None:
        """Set the trial count per state; states seen before but absent from `counts` drop to 0."""
        self._states |= set(counts)
        for state in self._states:
            SWEEP_TRIALS.labels(run=self.run, state=state).set(counts.get(state, 0))


def metric_names() -> set[str]:
    """Names of every series the registry exports, also before any value is set (counters as `*_total`)."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.add(family.name + "_total" if family.type == "counter" else family.name)
        names.update(sample.name for sample in family.samples)
    return names


def exposition() -> str:
    """The registry in Prometheus' text format (what /metrics serves)."""
    return generate_latest(REGISTRY).decode()


def serve(port: int, addr: str | None = None) -> int:
    """Serve /metrics on `addr:port` (0 picks a free port); idempotent per process. Returns the port.

    `addr` defaults to $OCTSSL_METRICS_ADDR, else 127.0.0.1. A second call returns the running
    server's port whatever it asks for: one process, one scrape target.
    """
    if "port" in _SERVER:
        return int(_SERVER["port"])  # type: ignore[call-overload]
    host = addr or os.environ.get("OCTSSL_METRICS_ADDR") or "127.0.0.1"
    try:
        server, thread = start_http_server(int(port), addr=host, registry=REGISTRY)
    except OSError as err:
        raise ConfigError(f"metrics port {host}:{port}: cannot serve /metrics ({err.strerror or err})") from err
    _SERVER.update(server=server, thread=thread, port=server.server_port, addr=host)
    return int(server.server_port)

