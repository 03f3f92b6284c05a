"""`octssl pretrain --resume` continues a run whose driver died, together with the whole local Ray cluster it
started (head and workers gone, as when a KubeRay head pod is replaced), on a new cluster (slow: two Ray
start-ups); the resumed run takes the loss trajectory of an uninterrupted Ray run of the same job."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import JOBS


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
@pytest.mark.timeout(1200)  # three Ray start-ups: minutes on a loaded 2-core machine
def test_resume_after_the_driver_died(train_corpus: Path, tmp_path: Path) -> None:
    storage = tmp_path / "runs"
    common = [
        sys.executable, "-m", "octssl", "pretrain", str(JOBS / "pretrain.yaml"),
        "--set", f"data.corpus={train_corpus}", "--set", f"run.storage_path={storage}",
        "--set", "data.crop=[16, 64]", "--set", "data.batch_size=2", "--set", "model.width=0.25",
        "--set", "run.max_steps=24", "--set", "run.ckpt_every=4", "--set", "run.log_every=1",
        "--set", "run.eval_every=100", "--set", "scaling.workers=1",
    ]
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    # the reference: the same job on its own Ray cluster, never interrupted
    reference = subprocess.run([*common, "--set", "run.name=reference"], env=env, capture_output=True, text=True,
                               timeout=600)
    assert reference.returncode == 0, reference.stderr[-2000:]
    args = [*common, "--set", "run.name=driver"]
    driver = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    snapshot = storage / "driver" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 300
    checkpointed = 0
    while time.time() < deadline and driver.poll() is None:
        try:
            checkpointed = json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["step"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            checkpointed = 0
        if checkpointed >= 8:
            break
        time.sleep(0.1)
    assert driver.poll() is None and checkpointed >= 8, "the driver finished or never checkpointed"
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
    driver.wait()
    registered = sorted(p.name for p in (storage / "driver").glob("checkpoint_*") if p.is_dir())
    stray = storage / "driver" / "checkpoint_2000-01-01_00-00-00.000000"  # uploaded, never registered
    shutil.copytree(storage / "driver" / registered[-1], stray)
    resumed = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((storage / "driver" / "summary.json").read_text())
    assert summary["steps"] == 24
    steps = [json.loads(line)["step"] for line in (storage / "driver" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 25))  # replayed steps replaced, none missing, none twice
    got, want = _losses(storage / "driver"), _losses(storage / "reference")
    assert got.keys() == want.keys()
    for step in want:  # after the lost cluster, the uninterrupted run's trajectory
        assert got[step] == pytest.approx(want[step], rel=1e-3, abs=1e-4), step
    assert not stray.exists()  # pruned at resume; Ray's own num_to_keep handles the registered ones
