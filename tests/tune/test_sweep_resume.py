"""A sweep whose driver is SIGKILLed continues in its own directory with ``--resume`` (slow: two Ray start-ups)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import yaml

from octssl.config.sweep import parse_sweep_config
from octssl.errors import ConfigError
from octssl.tune.sweep import sweep_dir_of


def _fingerprint(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: its content hash and modification time (a rewrite changes the latter)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _finished(trials: Path) -> list[Path]:
    return [d for d in sorted(trials.iterdir()) if (d / "summary.json").is_file()] if trials.is_dir() else []


def _unfinished_checkpoints(sweep: Path) -> list[tuple[Path, Path]]:
    """(newest Tune checkpoint on disk, octssl trial directory) of each trial without a summary yet, whether
    or not the saved experiment state records that checkpoint."""
    found = []
    for trial_dir in (sweep / "tune").glob("*/"):
        ckpts = sorted(trial_dir.glob("checkpoint_*"))
        if ckpts and (trial_dir / "params.json").is_file():
            trial = sweep / "trials" / json.loads((trial_dir / "params.json").read_text())["trial"]
            if not (trial / "summary.json").exists():
                found.append((ckpts[-1], trial))
    return found


def _newest_checkpoint_on_disk(sweep: Path) -> Path | None:
    return next((ckpt for ckpt, _ in _unfinished_checkpoints(sweep)), None)


def _trial_actors(session: int) -> list[psutil.Process]:
    """The Tune actors (trials run in their own process) of the driver's process session."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if os.getsid(proc.pid) == session and (proc.info["cmdline"] or [""])[0].startswith("ray::ImplicitFunc"):
                found.append(proc)
        except (ProcessLookupError, PermissionError):
            continue
    return found


def _signal_all(procs: list[psutil.Process], action: Callable[[psutil.Process], None]) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            action(proc)


def _recorded_unfinished(sweep: Path) -> Path | None:
    """A trial that has not finished and whose latest Tune checkpoint the experiment state already records
    (the state file was saved after the checkpoint was written)."""
    states = list((sweep / "tune").glob("experiment_state-*.json"))
    if not states:
        return None
    saved = max(p.stat().st_mtime for p in states)
    return next((trial for ckpt, trial in _unfinished_checkpoints(sweep) if ckpt.stat().st_mtime < saved - 0.5), None)


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_running_a_finished_trial_twice(sweep_raw, tmp_path: Path) -> None:
    # two cells of one trial each, run in turn: the first finishes, the second is killed after a checkpoint
    # (12 steps, a checkpoint every 3)
    raw = sweep_raw(fractions=[0.5, 1.0], resources={"cpus_per_trial": 1, "max_concurrent_trials": 1},
                    search={"num_samples": 1, "steps": [12], "grace_steps": 12, "lr": [0.003, 0.01],
                            "algorithm": "random"})
    raw["job"]["run"] = {"eval_every": 3, "log_every": 1}
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(raw))
    sweep = Path(raw["storage_path"]) / "s"
    args = [sys.executable, "-m", "octssl.jobs", str(config)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = tmp_path / "driver.log"
    with log.open("w") as out:
        driver = subprocess.Popen([*args, "--resume-if-exists"], env=env, start_new_session=True,
                                  stdout=out, stderr=subprocess.STDOUT)
    # Kill once the first trial finished and the second's checkpoint is in the saved experiment state. The
    # trial can outrun the state's save on a fast machine, so its actor is paused (SIGSTOP) as soon as a
    # checkpoint is on disk, while the driver goes on saving its state; if the state does not record that
    # checkpoint within a few seconds, the trial continues (SIGCONT) and is paused again at its next one.
    deadline, unfinished, tried = time.time() + 400, None, set()
    while time.time() < deadline and driver.poll() is None and unfinished is None:
        ckpt = _newest_checkpoint_on_disk(sweep) if _finished(sweep / "trials") else None
        if ckpt is not None and ckpt not in tried:
            tried.add(ckpt)
            paused = _trial_actors(driver.pid)
            assert paused, "no Tune trial actor (ray::ImplicitFunc) found in the driver's session"
            _signal_all(paused, psutil.Process.suspend)
            wait_until = time.time() + 8
            while time.time() < wait_until and (unfinished := _recorded_unfinished(sweep)) is None:
                time.sleep(0.2)
            if unfinished is None:
                _signal_all(paused, psutil.Process.resume)
        time.sleep(0.05)
    assert driver.poll() is None and unfinished is not None, log.read_text()[-3000:]
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
    driver.wait()
    finished = {d.name: _fingerprint(d) for d in _finished(sweep / "trials")}
    resumed_val = (unfinished / "val.jsonl").read_text().splitlines()

    t0 = time.time()
    done = subprocess.run([*args, "--resume-if-exists"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"resumed sweep: {time.time() - t0:.1f} s")  # noqa: T201 (reported in the closing note)

    for name, before in finished.items():  # never run again: every file as it was, not even rewritten
        assert _fingerprint(sweep / "trials" / name) == before, name
    summary = json.loads((sweep / "summary.json").read_text())
    assert {c["fraction"] for c in summary["cells"]} == {0.5, 1.0}
    assert all(c["best_config"] is not None for c in summary["cells"])
    assert sum(summary["trials"].values()) == 2
    # the unfinished trial continued from its checkpoint: its records up to it are the ones written before
    steps = [json.loads(line)["step"] for line in (unfinished / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))
    val_now = (unfinished / "val.jsonl").read_text().splitlines()
    kept = [line for line in resumed_val if json.loads(line)["step"] <= json.loads(val_now[0])["step"]]
    assert kept and val_now[: len(kept)] == kept
    again = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and json.loads((sweep / "summary.json").read_text()) == summary  # done: as it was


def test_resume_refuses_another_config_and_a_missing_sweep(sweep_raw) -> None:
    raw = sweep_raw()
    with pytest.raises(ConfigError, match="no such sweep to resume"):
        sweep_dir_of(parse_sweep_config(raw), resume=True)
    config, place, resuming = sweep_dir_of(parse_sweep_config(raw), resume="auto")
    assert not resuming
    place.local.mkdir(parents=True)
    (place.local / "sweep.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    assert sweep_dir_of(parse_sweep_config(raw), resume="auto")[2]
    assert sweep_dir_of(parse_sweep_config({**raw, "metrics_port": 9999}), resume=True)[2]
    with pytest.raises(ConfigError, match=r"exists with another config \(changed: seeds\)"):
        sweep_dir_of(parse_sweep_config({**raw, "seeds": [0, 1]}), resume=True)
    with pytest.raises(ConfigError, match="needs its name"):
        sweep_dir_of(parse_sweep_config({**raw, "name": None}), resume=True)
