"""MLflow experiment tracking: training runs, sweeps (a parent run, trials as child runs) and bundles in the
model registry. Off unless a tracking URI is set (``tracking.uri`` in the config, else ``MLFLOW_TRACKING_URI``);
off, mlflow is never imported.

- A training run is one MLflow run (:class:`MlflowSink`, rank 0's sink of the Trainer's recorder): the
  flattened config as parameters, ``train/*`` metrics at every log step, ``val/*`` at every evaluation,
  ``summary/*`` and the artifacts ``summary.json``, ``config.yaml`` and ``plots/*.png`` at the end.
- A sweep is a parent run (:func:`open_sweep_run`, :func:`finish_sweep_run`: sweep config, summary, report
  and figures); its trials are child runs written by Ray Tune's own ``MLflowLoggerCallback``
  (:func:`trial_callback`: each trial's parameters and every result it reports).
- A bundle (:func:`register_bundle`, called by ``export_model``) is logged as the artifact folder
  ``bundle/`` of the run it comes from and registered as a version of the model ``octssl-<task>``, with
  its threshold and metrics as tags and its card as the description. ``fetch_bundle("models:/octssl-ga/1")``
  (or ``mlflow artifacts download``) brings the folder back for ``load_bundle`` / ``octssl predict``.

Where a run lives is written to ``mlflow.json`` in its RUN_DIR or SWEEP_DIR: a resumed run continues
the same MLflow run, and a bundle exported from it is registered under it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from octssl import __version__
from octssl.errors import OctsslError
from octssl.observe.plots import plot_run
from octssl.observe.recorder import Sink

ENV_URI = "MLFLOW_TRACKING_URI"
RUN_FILE = "mlflow.json"
MODEL_PREFIX = "octssl-"  # registered model names: octssl-ga, octssl-rpd
BUNDLE_ARTIFACT = "bundle"
_PARAM_LIMIT = 6000  # MLflow's longest parameter value
_BATCH = 100  # MLflow's most parameters per log_batch call
_IGNORED = ("step", "time", "total_steps")  # metrics.jsonl keys that are not metrics of the step

log = logging.getLogger(__name__)


class TrackingError(OctsslError):
    """The MLflow tracking server refused or could not be reached."""


def tracking_uri(configured: str | None = None) -> str | None:
    """The tracking URI in force: the config's, else ``$MLFLOW_TRACKING_URI``; None means tracking is off."""
    return configured or os.environ.get(ENV_URI) or None


def _client(uri: str) -> Any:
    # Deferred here and below: mlflow is a heavy optional dependency, imported only when tracking is on.
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings as dotted keys with string values (lists as JSON), cut to MLflow's parameter limit."""
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:_PARAM_LIMIT]
    return out


def _numbers(values: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The finite-or-NaN numbers of ``values`` (bools and None left out) keyed ``prefix/name``."""
    return {f"{prefix}/{k}": float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclass(frozen=True)
class TrackedRun:
    """Where one octssl run or sweep is tracked (the content of its ``mlflow.json``)."""

    tracking_uri: str
    experiment_id: str
    run_id: str

    def save(self, folder: Path) -> None:
        (folder / RUN_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: Path) -> TrackedRun | None:
        path = folder / RUN_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else None

    @classmethod
    def find(cls, folder: Path, levels: int = 3) -> TrackedRun | None:
        """The tracked run of ``folder`` or of the nearest of its ``levels`` parents (a sweep's trial)."""
        for candidate in [folder, *folder.resolve().parents][: levels + 1]:
            found = cls.load(candidate)
            if found is not None:
                return found
        return None

    def log_metrics(self, client: Any, metrics: Mapping[str, float], step: int, when: float | None = None) -> None:
        from mlflow.entities import Metric

        stamp = int((when or time.time()) * 1000)
        client.log_batch(self.run_id, metrics=[Metric(k, v, stamp, step) for k, v in metrics.items()])

    def log_params(self, client: Any, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), _BATCH):
            client.log_batch(self.run_id, params=items[start:start + _BATCH])


def _experiment(client: Any, name: str) -> str:
    """The id of experiment ``name``, created when missing (another process may create it at the same time)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(name))
    except MlflowException:
        return str(client.get_experiment_by_name(name).experiment_id)


def open_run(uri: str, experiment: str, folder: Path, name: str, params: Mapping[str, str],
             tags: Mapping[str, str]) -> TrackedRun:
    """The MLflow run of ``folder``: the one its mlflow.json names (a resumed run, marked running again), else
    a new run in ``experiment`` with ``params`` and ``tags``, recorded in mlflow.json. TrackingError when the
    server cannot be used."""
    try:
        client = _client(uri)
        earlier = TrackedRun.load(folder)
        if earlier is not None and earlier.tracking_uri == uri:
            client.update_run(earlier.run_id, status="RUNNING")
            return earlier
        run = _create_run(client, uri, experiment, name, params, tags)
    except Exception as err:  # noqa: BLE001 - mlflow raises its own, requests' and OSError: all mean the same here
        raise TrackingError(f"MLflow tracking server {uri}: cannot open a run for {folder} ({err})") from err
    folder.mkdir(parents=True, exist_ok=True)
    run.save(folder)
    return run


def check_server(uri: str) -> None:
    """TrackingError unless the tracking server at ``uri`` answers (preflight: fail before any worker starts)."""
    try:
        _client(uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - mlflow's, requests' and OSError alike
        raise TrackingError(f"MLflow tracking server {uri} does not answer ({err}); unset {ENV_URI} and "
                            "tracking.uri to train without tracking") from err


def _create_run(client: Any, uri: str, experiment: str, name: str, params: Mapping[str, str],
                tags: Mapping[str, str]) -> TrackedRun:
    created = client.create_run(_experiment(client, experiment), run_name=name, tags=dict(tags))
    run = TrackedRun(uri, created.info.experiment_id, created.info.run_id)
    run.log_params(client, params)
    return run


def _tags(kind: str, folder: Path) -> dict[str, str]:
    return {"octssl.kind": kind, "octssl.version": __version__, "octssl.dir": str(folder)}


class MlflowSink(Sink):
    """Rank 0's MLflow run of a training job. A server that fails mid-run costs the records it refused
    (a warning each), never the training run."""

    def __init__(self, run: TrackedRun, run_dir: Path) -> None:
        self.run, self.run_dir = run, run_dir
        self.client = _client(run.tracking_uri)

    @classmethod
    def for_run(cls, uri: str, config: Any, run_dir: Path) -> MlflowSink:
        """Open (or, resuming, reopen) the MLflow run of a JobConfig's RUN_DIR."""
        params = flatten({k: v for k, v in config.model_dump(mode="json").items() if k != "tracking"})
        experiment = config.tracking.experiment or f"octssl-{config.kind}"
        run = open_run(uri, experiment, run_dir, config.run.name or run_dir.name, params, _tags(config.kind, run_dir))
        return cls(run, run_dir)

    def _send(self, what: str, action: Any) -> None:
        try:
            action()
        except Exception as err:  # noqa: BLE001 - tracking is a record of the run, not part of it
            log.warning("MLflow %s: %s not recorded (%s)", self.run.tracking_uri, what, err)

    def log(self, record: Mapping[str, Any]) -> None:
        metrics = _numbers({k: v for k, v in record.items() if k not in _IGNORED}, "train")
        self._send(f"step {record['step']}", lambda: self.run.log_metrics(self.client, metrics, record["step"],
                                                                          record.get("time")))

    def validation(self, step: int, values: Mapping[str, float]) -> None:
        self._send(f"evaluation at step {step}", lambda: self.run.log_metrics(self.client, _numbers(values, "val"), step))

    def finish(self, summary: Mapping[str, Any]) -> None:
        step = int(summary.get("steps") or 0)
        self._send("summary", lambda: self.run.log_metrics(self.client, _numbers(summary, "summary"), step))
        for name in ("summary.json", "config.yaml"):
            if (self.run_dir / name).is_file():
                self._send(name, lambda name=name: self.client.log_artifact(self.run.run_id, str(self.run_dir / name)))
        if (self.run_dir / "metrics.jsonl").is_file():
            self._send("plots", lambda: [self.client.log_artifact(self.run.run_id, str(p), "plots")
                                         for p in plot_run(self.run_dir)])
        self._send("end", lambda: self.client.set_terminated(self.run.run_id, "FINISHED"))


# ---------------------------------------------------------------- sweeps
def sweep_experiment(config: Any) -> str:
    return str(config.tracking.experiment or "octssl-sweep")


def open_sweep_run(config: Any, sweep_dir: Path) -> TrackedRun | None:
    """The parent run of a sweep (None when tracking is off): the sweep config as parameters."""
    uri = tracking_uri(config.tracking.uri)
    if uri is None:
        return None
    params = flatten({k: v for k, v in config.model_dump(mode="json").items() if k != "tracking"})
    return open_run(uri, sweep_experiment(config), sweep_dir, config.name or sweep_dir.name, params,
                    _tags("sweep", sweep_dir))


def trial_callback(run: TrackedRun, config: Any) -> Any:
    """Ray Tune's MLflowLoggerCallback, writing every trial as a child run of the sweep's ``run``: the
    trial's parameters (group, lr, weight_decay, steps) and each result it reports, at Tune's iteration."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return MLflowLoggerCallback(tracking_uri=run.tracking_uri, registry_uri=run.tracking_uri,
                                experiment_name=sweep_experiment(config),
                                tags={"mlflow.parentRunId": run.run_id, "octssl.kind": "trial"})


def finish_sweep_run(run: TrackedRun, sweep_dir: Path, metrics: Mapping[str, float]) -> None:
    """The sweep's results on its parent run: its test ``metrics`` (per cell, named by the sweep:
    ``SweepSummary.test_metrics``), summary.json, report.md and its figures. A server failing now costs the
    record (a warning), not the finished sweep's upload."""
    try:
        _finish_sweep_run(run, sweep_dir, metrics)
    except Exception as err:  # noqa: BLE001 - mlflow's, requests' and OSError alike
        log.warning("MLflow %s: the results of sweep %s were not recorded (%s)", run.tracking_uri, sweep_dir, err)


def _finish_sweep_run(run: TrackedRun, sweep_dir: Path, metrics: Mapping[str, float]) -> None:
    client = _client(run.tracking_uri)
    run.log_metrics(client, metrics, 0)
    for path in [sweep_dir / "summary.json", sweep_dir / "report.md", *sorted(sweep_dir.glob("*.png"))]:
        if path.is_file():
            client.log_artifact(run.run_id, str(path))
    client.set_terminated(run.run_id, "FINISHED")


# ---------------------------------------------------------------- model registry
def _card(config: Mapping[str, Any]) -> str:
    """The model version's description: what the bundle is, its threshold and metrics, where it comes from."""
    provenance = config.get("provenance") or {}
    lines = [f"octssl bundle: segmentation of {config.get('task')} ({config.get('format')}, "
             f"octssl {config.get('octssl_version')})", "",
             f"- threshold: {config.get('threshold')} ({config.get('threshold_source')})",
             f"- model: {json.dumps(config.get('model'))}", f"- input: {json.dumps(config.get('input'))}"]
    for split, values in (config.get("metrics") or {}).items():
        lines.append(f"- {split} metrics: {json.dumps(values)}")
    lines += [f"- {k}: {provenance[k]}" for k in ("run_dir", "sweep", "trial", "corpus") if provenance.get(k)]
    if config.get("card"):
        lines += ["", json.dumps(config["card"], indent=2, default=str)]
    return "\n".join(lines)


def register_bundle(files: Mapping[str, Path | str], config: Mapping[str, Any], source: Path) -> str | None:
    """Register a just-written bundle (``files``: name -> a file to copy or the text to write) as a new
    version of ``octssl-<task>``; returns its ``models:/`` URI, or None when tracking is off (no
    ``$MLFLOW_TRACKING_URI`` and ``source`` is no tracked run or sweep) or the server failed (a warning:
    the bundle on disk stands, a sweep's results with it).

    The files are logged as ``bundle/`` of the run ``source`` is tracked in (a new run in the experiment
    ``octssl-bundles`` otherwise); the version's tags hold the task, threshold and metrics."""
    tracked = TrackedRun.find(source)
    uri = tracking_uri() or (tracked.tracking_uri if tracked else None)
    if uri is None:
        return None
    try:
        return _register(uri, tracked, files, config, source)
    except Exception as err:  # noqa: BLE001 - mlflow's, requests' and OSError alike
        log.warning("MLflow tracking server %s: the %s bundle was written but not registered (%s)", uri,
                    config.get("task"), err)
        return None


def _register(uri: str, tracked: TrackedRun | None, files: Mapping[str, Path | str], config: Mapping[str, Any],
              source: Path) -> str:
    from mlflow.exceptions import MlflowException

    task = str(config["task"])
    client = _client(uri)
    run = tracked
    if run is None or run.tracking_uri != uri:
        run = _create_run(client, uri, "octssl-bundles", f"bundle-{task}", {}, _tags("bundle", source))
    with tempfile.TemporaryDirectory(prefix="octssl-register-") as folder:
        bundle = Path(folder) / BUNDLE_ARTIFACT
        bundle.mkdir()
        for name, content in files.items():
            if isinstance(content, Path):
                shutil.copyfile(content, bundle / name)
            else:
                (bundle / name).write_text(content)
        client.log_artifacts(run.run_id, str(bundle), BUNDLE_ARTIFACT)
    if run is not tracked:
        client.set_terminated(run.run_id, "FINISHED")
    model = MODEL_PREFIX + task
    try:
        client.create_registered_model(model, description=f"octssl segmentation bundles for {task}")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {"task": task, "threshold": str(config["threshold"]), "format": str(config.get("format")),
            **{f"metrics.{k}": v for k, v in flatten(config.get("metrics") or {}).items()}}
    version = client.create_model_version(model, f"runs:/{run.run_id}/{BUNDLE_ARTIFACT}", run_id=run.run_id,
                                          tags=tags, description=_card(config))
    return f"models:/{model}/{version.version}"


def fetch_bundle(model_uri: str, destination: str | Path, uri: str | None = None) -> Path:
    """Download a registered bundle (``models:/octssl-ga/3``, or ``models:/octssl-ga@alias``) into
    ``destination``; returns the bundle folder, ready for ``load_bundle`` or ``octssl predict --bundle``."""
    import mlflow

    where = tracking_uri(uri)
    if where is None:
        raise TrackingError(f"{model_uri}: no tracking server (set {ENV_URI})")
    Path(destination).mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(destination),
                                                    tracking_uri=where)
    except Exception as err:  # noqa: BLE001
        raise TrackingError(f"{where}: cannot fetch {model_uri} ({err})") from err
    return Path(local)
