"""Launcher: checks a job before any worker starts, then runs it under Ray Train (or one process).

With no ``RAY_ADDRESS`` a local Ray sized to this machine is started. Runs live in
``RUN_DIR = storage_path/name``; a new run refuses an existing RUN_DIR (Ray would silently resume it),
and ``resume=True`` continues one, also after the driver died: Ray Train finds the latest reported
checkpoint under the same name and storage path (``TorchTrainer.restore`` is deprecated in Train V2).
"""

from __future__ import annotations

import os
import shutil
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from octssl.cluster.local import require, root_cause
from octssl.config.job import JobConfig, dump_config
from octssl.corpus.icechunk import pinned
from octssl.corpus.store import Corpus
from octssl.errors import ConfigError, OctsslError, Preempted
from octssl.models.precision import resolve_precision
from octssl.observe.progress import RunWatcher
from octssl.observe.tracking import ENV_URI, check_server, tracking_uri
from octssl.storage.location import Location, is_url, ray_storage, staging_dir
from octssl.train import checkpoint as ckpt
from octssl.train import preempt
from octssl.train.engine import init_single_process_group
from octssl.train.summary import RunSummary, read_run_summary
from octssl.vocab import VAL, VOLUME


def name_run(config: JobConfig, resume: bool | str) -> JobConfig:
    """Give the run an absolute storage path, a name and (for an icechunk corpus) the snapshot it reads; check
    RUN_DIR against ``resume``
    (True: it must exist; False: it must not; "auto": continue it if it exists, e.g. a RayJob retry)."""
    config = config.model_copy(deep=True)
    if resume == "auto":
        if config.run.name is None:
            raise ConfigError("resume=auto needs a fixed run.name")
        resume = (Location.parse(config.run.storage_path) / config.run.name).exists()
    storage = Location.parse(config.run.storage_path)  # a URL stays a URL (s3://bucket/runs)
    config.run.storage_path = str(storage) if storage.remote else str(storage.local.resolve())
    # Ray workers do not start in this directory: every local path the run reads becomes absolute.
    config.data.corpus, config.data.shards = _absolute(config.data.corpus), _absolute(config.data.shards)
    if config.run.init != "scratch":
        config.run.init = str(_absolute(config.run.init))
    if config.run.name is None:
        if resume:
            raise ConfigError("--resume needs the run's name: --set run.name=NAME")
        config.run.name = f"{config.kind}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Location.parse(config.run_dir)
    if config.data.corpus:  # an icechunk corpus: every worker reads the snapshot the run starts on
        earlier = _pinned_before(run_dir, config.data.corpus) if resume else None
        config.data.corpus = earlier or pinned(config.data.corpus)
    if resume and not run_dir.exists():
        raise ConfigError(f"{run_dir}: no such run to resume")
    if not resume and run_dir.exists():
        raise ConfigError(f"{run_dir} already exists: pass --resume to continue it, or choose another run.name")
    if resume:
        _check_same_run(config, run_dir)
    return config


#: config keys a resumed run may change: how long it trains and how often it may fail, not what it trains
RESUMABLE_CHANGES = ("run.max_steps", "run.epochs", "scaling.max_failures")


def _check_same_run(config: JobConfig, run_dir: Location) -> None:
    """Refuse to continue RUN_DIR with another config than the one it started with: a re-applied manifest
    (``--resume-if-exists``) for a new experiment under an old run.name must not continue the old run."""

    saved = next((path for path in _saved_configs(run_dir) if path.is_file()), None)
    if saved is None:
        return  # killed before it wrote its config: nothing to compare with
    before = _flat(yaml.safe_load(saved.read_bytes()) or {})
    now = _flat(yaml.safe_load(dump_config(config)) or {})
    changed = sorted(k for k in set(before) | set(now)
                     if before.get(k) != now.get(k) and not k.startswith(RESUMABLE_CHANGES))
    if changed:
        raise ConfigError(f"{saved}: run {config.run.name!r} exists with another config (changed: "
                          f"{', '.join(changed)}): a new experiment needs a new run.name")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"run": {"name": x}} -> {"run.name": x}: the changed keys named as --set names them."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _absolute(value: str | None) -> str | None:
    """A local path made absolute; a URL (or ``URL@SNAPSHOT``) and None as they are."""
    if value is None or is_url(value):
        return value
    return str(Path(value).expanduser().resolve())


def _pinned_before(run_dir: Location, corpus: str) -> str | None:
    """The ``corpus@SNAPSHOT`` a run being resumed started on (from its config.yaml, in RUN_DIR or, for a run
    on an object store, its local staging copy), so a resumed run reads the same snapshot; None if none."""

    for saved in _saved_configs(run_dir):
        if saved.is_file():
            before = str((yaml.safe_load(saved.read_bytes()) or {}).get("data", {}).get("corpus") or "")
            if before.startswith(corpus.rstrip("/") + "@"):
                return before
    return None


def _saved_configs(run_dir: Location) -> list[Location]:
    """Where a run's config.yaml may be: RUN_DIR, and for a run on an object store its local staging copy."""
    saved = [run_dir / "config.yaml"]
    if run_dir.remote:
        saved.append(Location.parse(staging_dir(run_dir)) / "config.yaml")
    return saved


def preflight(config: JobConfig) -> dict[str, Any]:
    """Everything that can be checked without workers: data, labels, model shapes, init weights, precision.
    Raises ConfigError/ModelError naming the problem; returns a few facts about the data."""
    from octssl.data.feed import build_train_data
    from octssl.train.components import build_components, load_init_weights

    c = config
    resolve_precision(c.deepspeed.precision, gpu=c.scaling.gpus_per_worker > 0)
    uri = tracking_uri(c.tracking.uri)
    if uri:
        check_server(uri)
    data = build_train_data(c)
    facts: dict[str, Any] = {"train_volumes": data.volumes}
    if c.data.corpus:
        facts["val_volumes"] = len(Corpus.open(c.data.corpus).ids(split=VAL, require=(VOLUME, c.objective.target)))
    nb, depth, w = data.volume_shape()
    crop_nb, crop_w = c.data.crop
    if crop_nb > nb or crop_w > w:
        raise ConfigError(f"data.crop={tuple(c.data.crop)} is larger than the volumes (nB={nb}, W={w})")
    components = build_components(c, load_init=False)  # the Trainer's objective and model
    components.objective.check_enface((crop_nb, crop_w), "data.crop")
    components.model.check_input_shape((c.data.batch_size, 1, crop_nb, depth, crop_w))
    load_init_weights(components.model, c)
    return facts


def _ray_up(config: JobConfig) -> None:
    scaling = config.scaling
    require(f"scaling: {scaling.workers} workers x ({scaling.cpus_per_worker} CPU, {scaling.gpus_per_worker} GPU)",
            scaling.workers * scaling.cpus_per_worker, scaling.workers * scaling.gpus_per_worker)


def _worker_env(config: JobConfig) -> dict[str, str]:
    env = {"OMP_NUM_THREADS": str(max(1, int(config.scaling.cpus_per_worker)))}
    if config.scaling.gpus_per_worker == 0:
        env["DS_ACCELERATOR"] = "cpu"
    for key in ("OCTSSL_FAULT_NAN_STEPS", ENV_URI, "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def run(
    config: JobConfig, *, resume: bool | str = False, progress: bool = True, metrics_port: int | None = None
) -> RunSummary:
    """Run a pretraining or fine-tuning job under Ray Train; returns its summary.json."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from octssl.train.loop import train_loop_per_worker

    config = name_run(config, resume)
    preflight(config)
    _ray_up(config)
    remote = Location.parse(config.run_dir)  # on an object store, workers write a local copy and upload it
    run_dir = staging_dir(remote) if remote.remote else remote.local
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.prune_unregistered(run_dir)  # what a killed driver left half-registered
    (run_dir / preempt.MARKER).unlink(missing_ok=True)  # an earlier attempt's: this one continues it
    (run_dir / "config.yaml").write_text(dump_config(config))
    gpu = config.scaling.gpus_per_worker > 0
    resources = {"CPU": config.scaling.cpus_per_worker}
    if gpu:
        resources["GPU"] = config.scaling.gpus_per_worker
    storage_path, storage_filesystem = ray_storage(config.run.storage_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": config.model_dump(mode="json"), "run_dir": str(run_dir), "metrics_port": metrics_port,
                           "attempt": uuid.uuid4().hex, "remote_run_dir": str(remote) if remote.remote else None},
        scaling_config=ScalingConfig(num_workers=config.scaling.workers, use_gpu=gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(  # type: ignore[call-arg]  # Train V2 field
            name=config.run.name,
            storage_path=storage_path, storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=config.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.run.keep_last),
            worker_runtime_env={"env_vars": _worker_env(config)},
        ),
    )

    watcher = RunWatcher(run_dir, enabled=progress)
    watcher.start()
    try:
        with preempt.on_sigterm(config.run.name or "run", str(run_dir)):
            result = trainer.fit()
    except Exception as err:  # Ray wraps worker errors; surface the cause's message
        raise OctsslError(f"{run_dir}: training failed: {root_cause(err)}") from err
    finally:
        watcher.stop()
    if result.error is not None:
        raise OctsslError(f"{run_dir}: training failed: {root_cause(result.error)}")
    _raise_if_preempted(run_dir)
    if remote.remote:
        return _remote_summary(run_dir, remote)
    return read_run_summary((run_dir / "summary.json").read_text())


def _raise_if_preempted(run_dir: Path) -> None:
    """A run that stopped on a preemption request ended without a summary: say where and how to go on."""
    marker = preempt.read_marker(run_dir)
    if marker is not None:
        raise Preempted(f"{run_dir}: preempted (SIGTERM): stopped cleanly after the checkpoint at step "
                        f"{marker['step']}; continue with --resume (a retried RayJob does: --resume-if-exists)")


def _remote_summary(run_dir: Path, remote: Location) -> RunSummary:
    """summary.json of a run on an object store, its weight paths pointing at the uploaded files."""
    summary = read_run_summary((remote / "summary.json").read_bytes())
    for key in ("weights", "best_weights"):
        value = getattr(summary, key)
        if value is not None and value.startswith(str(run_dir)):
            setattr(summary, key, str(remote) + value[len(str(run_dir)):])
    (remote / "summary.json").write_bytes(summary.model_dump_json(indent=2).encode())
    (remote / "config.yaml").upload(run_dir / "config.yaml")
    return summary


def run_single_process(config: JobConfig, *, resume_from: Path | None = None,
                       metrics_port: int | None = None) -> RunSummary:
    """The same Trainer in this process (world size 1, no Ray): benchmarks, single-GPU checks, and
    (with ``metrics_port``) a run whose /metrics a test's Prometheus scrapes.
    Checkpoints are copied to ``RUN_DIR/checkpoints/stepNNNNNNNN``."""

    from octssl.train.loop import Trainer, WorkerContext

    config = name_run(config, resume=False)
    preflight(config)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(config))
    init_single_process_group()
    ckpts = run_dir / "checkpoints"

    def report(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        if ckpt_dir is not None:
            shutil.copytree(ckpt_dir, ckpts / f"step{metrics['step']:08d}", dirs_exist_ok=True)

    ctx = WorkerContext(rank=0, world_size=1, run_dir=run_dir, report=report, resume_from=resume_from,
                        metrics_port=metrics_port)
    with preempt.on_sigterm(config.run.name or "run", str(run_dir)):
        summary = Trainer(config, ctx).train()
    _raise_if_preempted(run_dir)
    if summary is None:  # stopped on a request from another process, its marker since removed
        raise Preempted(f"{run_dir}: preempted; continue with --resume")
    return summary
