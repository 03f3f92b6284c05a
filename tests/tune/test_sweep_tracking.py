"""A tracked sweep against a real `mlflow server` (conftest.mlflow_server): one parent run with the sweep's
parameters, results and report, its trials as child runs (Ray Tune's MLflowLoggerCallback) with their
parameters and reported metrics, and the sweep's bundle registered under the parent run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from octssl.config.sweep import parse_sweep_config
from octssl.observe.tracking import TrackedRun
from octssl.tune.sweep import run_sweep


@pytest.mark.slow  # Ray, a tracking server and two trials: about 2 minutes on 2 cores
def test_a_sweep_is_a_parent_run_with_its_trials_as_children(local_ray, sweep_raw, mlflow_server: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    raw = sweep_raw(search={"num_samples": 2, "steps": [4], "grace_steps": 2, "lr": [0.003, 0.01]},
                    tracking={"uri": mlflow_server, "experiment": "sweep-test"})
    raw["job"]["run"] = {"eval_every": 2, "log_every": 1}
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the config key alone turns tracking on
    summary = run_sweep(parse_sweep_config(raw), progress=False)
    assert summary.sweep_dir is not None
    parent = TrackedRun.load(Path(summary.sweep_dir))
    assert parent is not None
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(parent.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "s"
    assert json.loads(run.data.params["tasks"]) == ["ga"]
    cell = summary.cells[0]
    assert run.data.metrics["test/ga-1.0-scratch-fpn/dice_mean"] == pytest.approx(cell.dice_mean)
    assert {"summary.json", "report.md", "bundle"} <= {a.path for a in client.list_artifacts(parent.run_id)}

    children = client.search_runs([parent.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert len(children) == 2
    lrs = sorted(float(c.data.params["lr"]) for c in children)  # drawn from the search range, one per trial
    assert all(0.003 <= lr <= 0.01 for lr in lrs) and lrs[0] != lrs[1]
    for child in children:
        assert child.info.status == "FINISHED"
        reported = [m.value for m in client.get_metric_history(child.info.run_id, "step")]
        assert reported == [2.0, 4.0]  # each evaluation the trial reported to Tune
        assert 0 <= child.data.metrics["dice_pooled"] <= 1

    versions = client.search_model_versions("name = 'octssl-ga'")
    assert any(v.run_id == parent.run_id for v in versions), "the sweep's bundle is not registered under it"
