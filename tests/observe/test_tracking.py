"""MLflow tracking against a real `mlflow server` (SQLite, local artifacts, loopback; conftest.mlflow_server):
a training run's parameters, per-step metrics, summary and plots; a resumed run continuing its MLflow run;
a bundle registered with its threshold and metrics and fetched back; nothing at all when tracking is off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from octssl.config.job import load_config
from octssl.observe.tracking import RUN_FILE, TrackedRun, fetch_bundle
from octssl.train.launch import run_single_process

REPO = Path(__file__).resolve().parents[2]
TINY = ["data.crop=[16, 64]", "data.batch_size=2", "data.crops_per_volume=2", "data.val_volumes=2",
        "model.width=0.25", "run.max_steps=4", "run.log_every=1", "run.eval_every=2", "run.ckpt_every=2",
        "optim.warmup_steps=0"]


@pytest.fixture
def client(mlflow_server: str, monkeypatch: pytest.MonkeyPatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return MlflowClient(tracking_uri=mlflow_server)


def _job(corpus: Path, runs: Path, name: str, *extra: str):
    return load_config(REPO / "jobs" / "pretrain.yaml",
                       [f"data.corpus={corpus}", f"run.storage_path={runs}", f"run.name={name}", *TINY, *extra])


def test_a_training_run_is_one_mlflow_run(client, tiny_corpus: Path, tmp_path: Path) -> None:
    job = _job(tiny_corpus, tmp_path, "tracked", "tracking.experiment=octssl-test")
    summary = run_single_process(job)
    run_dir = tmp_path / "tracked"
    tracked = TrackedRun.load(run_dir)
    assert tracked is not None
    run = client.get_run(tracked.run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "octssl-test"
    assert float(run.data.params["optim.lr"]) == job.optim.lr
    assert run.data.params["run.max_steps"] == "4" and run.data.params["model.width"] == "0.25"
    # every logged step of metrics.jsonl, value for value; every evaluation of val.jsonl
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    history = client.get_metric_history(tracked.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"])) for r in logged]
    val = [json.loads(line) for line in (run_dir / "val.jsonl").read_text().splitlines()]
    assert [m.step for m in client.get_metric_history(tracked.run_id, "val/val_loss")] == [r["step"] for r in val]
    assert run.data.metrics["summary/steps"] == summary.steps == 4
    artifacts = {a.path for a in client.list_artifacts(tracked.run_id)}
    assert {"summary.json", "config.yaml", "plots"} <= artifacts
    assert {Path(a.path).name for a in client.list_artifacts(tracked.run_id, "plots")} >= {"loss.png", "throughput.png"}


def test_a_resumed_run_continues_its_mlflow_run(client, tiny_corpus: Path, tmp_path: Path) -> None:
    first = _job(tiny_corpus, tmp_path / "a", "resumed")
    run_single_process(first)
    run_dir = tmp_path / "a" / "resumed"
    tracked = TrackedRun.load(run_dir)
    assert tracked is not None
    # the same run directory, resumed from its step-2 checkpoint (as --resume does): same MLflow run
    from octssl.train.launch import name_run
    from octssl.train.loop import Trainer, WorkerContext

    config = name_run(first, resume=True)
    ctx = WorkerContext(rank=0, world_size=1, run_dir=run_dir, report=lambda m, p: None,
                        resume_from=run_dir / "checkpoints" / "step00000002")
    Trainer(config, ctx).train()
    assert TrackedRun.load(run_dir) == tracked
    runs = client.search_runs([tracked.experiment_id], "attributes.run_name = 'resumed'")
    assert [r.info.run_id for r in runs] == [tracked.run_id]
    steps = [m.step for m in client.get_metric_history(tracked.run_id, "train/loss")]
    assert steps == [1, 2, 3, 4, 3, 4]  # steps 3 and 4 replayed after the resume, logged again
    assert client.get_run(tracked.run_id).info.status == "FINISHED"


def test_an_exported_bundle_is_registered_and_fetched_back(client, finetuned_run: Path, tmp_path: Path) -> None:
    from octssl.apply.bundle import export_model, load_bundle

    out = export_model(finetuned_run, "ga", tmp_path / "bundle")
    config = json.loads((Path(out) / "config.json").read_text())
    versions = client.search_model_versions("name = 'octssl-ga'")
    assert versions, "no model version registered"
    version = max(versions, key=lambda v: int(v.version))
    assert float(version.tags["threshold"]) == config["threshold"]
    assert version.tags["metrics.val.dice_pooled"] == json.dumps(config["metrics"]["val"]["dice_pooled"])
    assert f"threshold: {config['threshold']}" in version.description
    fetched = fetch_bundle(f"models:/octssl-ga/{version.version}", tmp_path / "fetched")
    bundle = load_bundle(fetched)  # octssl's own checks: format, version, weights' sha256
    assert bundle.threshold == config["threshold"]
    assert (fetched / "model.safetensors").read_bytes() == (Path(out) / "model.safetensors").read_bytes()


def test_untracked_runs_need_no_mlflow(tiny_corpus: Path, tmp_path: Path) -> None:
    """Tracking off, a whole training run (and the sweep and bundle modules) runs where mlflow cannot be
    imported at all, as on an install without the [mlflow] extra, and writes no mlflow.json. (With mlflow
    installed, `import monai` imports it on its own: monai.handlers' optional_import.)"""
    code = f"""
import sys
sys.modules["mlflow"] = None  # any `import mlflow` now raises ImportError
from pathlib import Path
from octssl.config.job import load_config
from octssl.train.launch import run_single_process
import octssl.apply.bundle, octssl.tune.sweep
job = load_config({str(REPO / 'jobs' / 'pretrain.yaml')!r}, {[f'data.corpus={tiny_corpus}',
                  f'run.storage_path={tmp_path}', 'run.name=plain', *TINY]!r})
print("steps:", run_single_process(job).steps)
print("mlflow.json:", Path({str(tmp_path / 'plain' / RUN_FILE)!r}).exists())
"""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "steps: 4" in done.stdout and "mlflow.json: False" in done.stdout, done.stdout
