"""Preemption: SIGTERM to a training driver becomes a checkpoint at the next step and a clean stop within the
grace period; the resumed run loses no step that was done before the signal."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from octssl.train import preempt

from .conftest import JOBS

# Room for the stop to land before the run ends on its own: rank 0 polls for a request every 0.5 s, and on a
# fast CPU (~0.2 s per step here) 5-8 more steps run between the signal and the checkpoint.
STEPS = 40


def test_a_request_counts_only_for_runs_started_before_it(monkeypatch) -> None:
    monkeypatch.setattr(preempt, "_local_request", None)
    before = time.time()
    assert not preempt.requested("r", since=before - 1)
    preempt.request("r")
    assert preempt.requested("r", since=before - 1)  # a run that was training when it came
    assert not preempt.requested("r", since=time.time() + 1)  # a run resumed after it: not stopped again
    poll = preempt.Poll("r", since=before - 1, every=3600)
    assert poll() and not poll()  # read at most once per `every`
    monkeypatch.setenv(preempt.GRACE_ENV, "7.5")
    assert preempt.grace_s() == 7.5
    monkeypatch.setenv(preempt.GRACE_ENV, "soon")
    assert preempt.grace_s() == preempt.DEFAULT_GRACE_S


@pytest.mark.slow
def test_sigterm_to_the_driver_checkpoints_and_the_resumed_run_loses_no_step(train_corpus: Path,
                                                                            tmp_path: Path) -> None:
    storage, grace = tmp_path / "runs", 60.0  # generous for a loaded 2-core machine; measured below
    run_dir = storage / "preempted"
    args = [
        sys.executable, "-m", "octssl", "pretrain", str(JOBS / "pretrain.yaml"),
        "--set", f"data.corpus={train_corpus}", "--set", f"run.storage_path={storage}", "--set", "run.name=preempted",
        "--set", "data.crop=[16, 64]", "--set", "data.batch_size=2", "--set", "model.width=0.25",
        "--set", f"run.max_steps={STEPS}", "--set", "run.ckpt_every=1000", "--set", "run.log_every=1",
        "--set", "run.eval_every=1000", "--set", "scaling.workers=1",
    ]
    env = {**os.environ, preempt.GRACE_ENV: str(grace)}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "driver.log"
    with log.open("w") as out:
        driver = subprocess.Popen(args, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    beat_file, beat = run_dir / "workers" / "rank0.json", {"step": 0}
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None and beat["step"] < 4:
        try:
            beat = json.loads(beat_file.read_text())
        except (OSError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    assert driver.poll() is None and beat["step"] >= 4, log.read_text()[-3000:]
    signalled = time.monotonic()
    driver.send_signal(signal.SIGTERM)  # only the driver: its local Ray and the worker go on until told
    try:
        code = driver.wait(timeout=grace + 30)
    finally:
        with contextlib.suppress(ProcessLookupError):  # what is left of its local Ray, if anything
            os.killpg(driver.pid, signal.SIGKILL)
    stopped_s = time.monotonic() - signalled
    text = log.read_text()
    assert code == 128 + signal.SIGTERM and "preempted (SIGTERM): stopped cleanly after the checkpoint at step" in text, \
        text[-3000:]
    marker = json.loads((run_dir / preempt.MARKER).read_text())
    assert beat["step"] <= marker["step"] < STEPS  # every step done before the signal is in the checkpoint
    snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    assert snapshot["latest_checkpoint_result"]["metrics"]["step"] == marker["step"]
    print(f"SIGTERM -> driver exit {stopped_s:.1f} s, checkpoint {marker['after_request_s']:.1f} s after the "
          f"request, at step {marker['step']} (step {beat['step']} seen before the signal)")  # noqa: T201

    resumed_at = time.time()
    resumed = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (run_dir / preempt.MARKER).exists()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    # each step trained once: the steps up to the checkpoint are the first attempt's records (none replayed),
    # the rest the resumed run's
    assert all((r["time"] < resumed_at) == (r["step"] <= marker["step"]) for r in records)
