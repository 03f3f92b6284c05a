"""Prometheus metrics for training and sweeps: definitions, per-rank recorders and the /metrics exporter.

Every metric lives in one module-level registry, `REGISTRY` (the only global state the project allows),
and is named `octssl_*`. Training series carry Ray Train's own label names, `ray_train_run_name` (the
run's name, which is also Ray Train's run name) and `ray_train_worker_world_rank`, so that octssl's
series join Ray Train's (`ray_train_*`) in one PromQL expression. Rates come from counters and
histograms (`rate(octssl_samples_total[5m])`), never from client-side averages, so that Prometheus
aggregates them correctly across ranks, scrapes and restarts. docs/monitoring.md lists every metric.

Ports: one HTTP server per process. Under Ray Train every rank is its own process, so a run with several
ranks on one machine serves rank r on `port + r` (on Kubernetes each worker pod holds one rank and every
pod serves the same port, `PORT` in k8s/). `serve` binds 127.0.0.1 unless told otherwise or unless the
environment variable `OCTSSL_METRICS_ADDR` names another address (k8s/ sets 0.0.0.0 so that the
PodMonitor reaches it; the NetworkPolicy there limits who may).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from importlib import metadata

import psutil
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)

from octssl import __version__
from octssl.errors import ConfigError

disable_created_metrics()  # no `*_created` gauge beside every counter and histogram: series nobody queries
REGISTRY = CollectorRegistry(auto_describe=True)

#: Ray Train's label names (ray.train.v2._internal.metrics: RUN_NAME_TAG_KEY, WORKER_WORLD_RANK_TAG_KEY)
RUN_LABEL = "ray_train_run_name"
RANK_LABEL = "ray_train_worker_world_rank"
_RANK = (RUN_LABEL, RANK_LABEL)
#: octssl's metrics port (k8s/, docs): outside Prometheus' exporter allocations (9100-9999 is full and
#: 9100 is node_exporter's), Ray's worker ports (10002-19999) and Linux's ephemeral ports (32768-60999),
#: with room for PORT+rank. docs/monitoring.md, "Which port".
PORT = 29100
#: values of the `kind` label of octssl_memory_bytes
MEMORY_KINDS = ("device_allocated", "device_reserved", "device_peak_allocated", "host_rss")

_STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_WAIT_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_CKPT_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

BUILD_INFO = Gauge("octssl_build_info", "Versions of octssl and its stack in this process (value 1)",
                   ("version", "torch", "deepspeed", "ray"), registry=REGISTRY)
SAMPLES = Counter("octssl_samples", "Training samples consumed by this rank", _RANK, registry=REGISTRY)
STEPS = Counter("octssl_steps", "Optimizer steps taken by this rank (skipped non-finite steps included)", _RANK,
                registry=REGISTRY)
SKIPPED_STEPS = Counter("octssl_skipped_steps", "Steps skipped because the loss was not finite", _RANK,
                        registry=REGISTRY)
WORKER_RESTARTS = Counter("octssl_worker_restarts", "Times this rank started again from a checkpoint", _RANK,
                          registry=REGISTRY)
STEP_DURATION = Histogram(
    "octssl_step_duration_seconds", "Wall time of one optimizer step, data wait and collectives included",
    _RANK, buckets=_STEP_BUCKETS, registry=REGISTRY)
STEP_LOCAL = Histogram(
    "octssl_step_local_seconds", "Time of one step before its first collective (data wait, forward, loss): "
    "the part that shows which rank is slow", _RANK, buckets=_STEP_BUCKETS, registry=REGISTRY)
DATA_WAIT = Histogram("octssl_data_wait_seconds", "Time one step waited for its batch", _RANK,
                      buckets=_WAIT_BUCKETS, registry=REGISTRY)
CHECKPOINT_DURATION = Histogram("octssl_checkpoint_duration_seconds", "Wall time of one checkpoint save", _RANK,
                                buckets=_CKPT_BUCKETS, registry=REGISTRY)
LAST_CHECKPOINT = Gauge("octssl_last_checkpoint_timestamp_seconds",
                        "Unix time of the last checkpoint saved (the rank's start until its first)", _RANK,
                        registry=REGISTRY)
CHECKPOINT_INTERVAL = Gauge("octssl_checkpoint_interval_steps", "Steps between checkpoints (run.ckpt_every)",
                            _RANK, registry=REGISTRY)
STEP = Gauge("octssl_step", "Optimizer step reached (restarts from the checkpoint's step)", _RANK,
             registry=REGISTRY)
TOTAL_STEPS = Gauge("octssl_total_steps", "Optimizer steps the run is planned to take", _RANK, registry=REGISTRY)
LOSS = Gauge("octssl_loss", "Training loss at the last logged step (NaN stays NaN)", _RANK, registry=REGISTRY)
LEARNING_RATE = Gauge("octssl_learning_rate", "Learning rate at the last logged step", _RANK, registry=REGISTRY)
GRAD_NORM = Gauge("octssl_grad_norm", "Global gradient norm (before clipping) at the last logged step", _RANK,
                  registry=REGISTRY)
VALIDATION = Gauge("octssl_validation", "Validation metric (label `metric`: val_loss, ssim, l1, dice, hd95_mm) "
                   "at the last evaluation", (*_RANK, "metric"), registry=REGISTRY)
MEMORY = Gauge("octssl_memory_bytes", "Memory of this rank by `kind`: device_allocated, device_reserved, "
               "device_peak_allocated (accelerator) or host_rss (resident host memory)", (*_RANK, "kind"),
               registry=REGISTRY)
DEVICE_CAPACITY = Gauge("octssl_device_memory_capacity_bytes", "Total memory of this rank's accelerator", _RANK,
                        registry=REGISTRY)
SWEEP_TRIALS = Gauge("octssl_sweep_trials", "Sweep trials by state (PENDING, RUNNING, TERMINATED, ERROR)",
                     (RUN_LABEL, "state"), registry=REGISTRY)

# The exporter's own state: the one HTTP server of this process, kept beside the registry it serves.
_SERVER: dict[str, object] = {}


def publish_build_info() -> None:
    """Set `octssl_build_info` for this process (idempotent)."""

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "none"

    BUILD_INFO.labels(version=__version__, torch=version("torch"), deepspeed=version("deepspeed"),
                      ray=version("ray")).set(1)


class TrainMetrics:
    """Records one rank's training metrics under Ray Train's labels (run name, world rank)."""

    def __init__(self, rank: int, run: str) -> None:
        self.rank = int(rank)
        self.run = str(run)
        self._labels = {RUN_LABEL: self.run, RANK_LABEL: str(self.rank)}
        publish_build_info()
        # Counters and histograms start at 0 so that increase()/rate() in the alert rules and the dashboard
        # see their first increment (a series born at 1 shows no increase: a short run's one checkpoint
        # between two scrapes would read as none).
        for series in (SAMPLES, STEPS, SKIPPED_STEPS, WORKER_RESTARTS, STEP_DURATION, STEP_LOCAL, DATA_WAIT,
                       CHECKPOINT_DURATION):
            series.labels(**self._labels)
        LAST_CHECKPOINT.labels(**self._labels).set(time.time())  # the checkpoint-age alert counts from here

    def observe_step(self, *, seconds: float, local_s: float, data_wait_s: float, samples: int) -> None:
        """Count one optimizer step of `samples` samples and record its timings."""
        labels = self._labels
        STEPS.labels(**labels).inc()
        SAMPLES.labels(**labels).inc(samples)
        STEP_DURATION.labels(**labels).observe(seconds)
        STEP_LOCAL.labels(**labels).observe(local_s)
        DATA_WAIT.labels(**labels).observe(data_wait_s)

    def update(self, *, step: int, total_steps: int | None = None, checkpoint_every: int | None = None,
               loss: float | None = None, lr: float | None = None, grad_norm: float | None = None,
               memory: Mapping[str, float] | None = None, device_capacity: float | None = None) -> None:
        """Record the state at optimizer step `step`; values left None keep their last value.

        `memory` maps a kind of MEMORY_KINDS to bytes.
        """
        labels = self._labels
        STEP.labels(**labels).set(step)
        for gauge, value in ((TOTAL_STEPS, total_steps), (CHECKPOINT_INTERVAL, checkpoint_every), (LOSS, loss),
                             (LEARNING_RATE, lr), (GRAD_NORM, grad_norm), (DEVICE_CAPACITY, device_capacity)):
            if value is not None:
                gauge.labels(**labels).set(float(value))
        for kind, value in (memory or {}).items():
            if kind not in MEMORY_KINDS:
                raise ValueError(f"memory kind {kind!r}: expected one of {MEMORY_KINDS}")
            MEMORY.labels(**labels, kind=kind).set(float(value))

    def validation(self, values: Mapping[str, float]) -> None:
        """Record the metrics of one evaluation (name -> value)."""
        for name, value in values.items():
            VALIDATION.labels(**self._labels, metric=name).set(float(value))

    def checkpoint(self, seconds: float) -> None:
        """Record one checkpoint save that took `seconds` and ended now."""
        CHECKPOINT_DURATION.labels(**self._labels).observe(float(seconds))
        LAST_CHECKPOINT.labels(**self._labels).set(time.time())

    def skipped_step(self) -> None:
        """Count one step skipped for a non-finite loss (it is counted as a step by observe_step too)."""
        SKIPPED_STEPS.labels(**self._labels).inc()

    def restart(self, *, count: bool = True) -> None:
        """Note that this rank resumed from a checkpoint; ``count`` it as a restart after a failure (a
        deliberate ``--resume`` is not one). Steps are counted as taken, so resumed ones are not recounted."""
        if count:
            WORKER_RESTARTS.labels(**self._labels).inc()

    def values(self) -> dict[str, float]:
        """This rank's current samples (tests and logs; NaN stays NaN). Series with more labels than the
        rank's are keyed `name{label=value,...}` with those extra labels."""
        found: dict[str, float] = {}
        for family in REGISTRY.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                if all(sample.labels.get(k) == v for k, v in self._labels.items()):
                    extra = {k: v for k, v in sample.labels.items() if k not in self._labels}
                    key = sample.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(extra.items())) + "}"
                                         if extra else "")
                    found[key] = sample.value
        return found


class SweepMetrics:
    """Records how many trials of one sweep are in each state."""

    def __init__(self, run: str) -> None:
        self.run = str(run)
        self._states: set[str] = set()
        publish_build_info()

    def update(self, counts: Mapping[str, int]) -> None:
        """Set the trial count per state; states seen before but absent from `counts` drop to 0."""
        self._states |= set(counts)
        for state in self._states:
            SWEEP_TRIALS.labels(**{RUN_LABEL: self.run}, state=state).set(counts.get(state, 0))


def families() -> dict[str, str]:
    """Metric family name -> Prometheus type ("counter" families without their `_total` suffix)."""
    return {family.name: family.type for family in REGISTRY.collect()}


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
    publish_build_info()
    try:
        server, thread = start_http_server(int(port), addr=host, registry=REGISTRY)
    except OSError as err:
        raise ConfigError(f"metrics port {host}:{port}: cannot serve /metrics ({err.strerror or err})") from err
    _SERVER.update(server=server, thread=thread, port=server.server_port, addr=host)
    return int(server.server_port)


def memory_now(device: object | None) -> tuple[dict[str, float], float | None]:
    """This process's memory by kind (MEMORY_KINDS) and its accelerator's capacity (None on CPU)."""
    import torch

    found = {"host_rss": float(psutil.Process().memory_info().rss)}
    if isinstance(device, torch.device) and device.type == "cuda":
        found.update(device_allocated=float(torch.cuda.memory_allocated(device)),
                     device_reserved=float(torch.cuda.memory_reserved(device)),
                     device_peak_allocated=float(torch.cuda.max_memory_allocated(device)))
        return found, float(torch.cuda.get_device_properties(device).total_memory)
    return found, None
