"""Recovery: how long a run is down after a fault, and how much work it loses, on a real local Ray cluster.

Usage: python benchmarks/bench_recovery.py [--steps 30] [--ckpt-every 5] [--only lost,preempt,sweep]
                                           [--out benchmarks/results/recovery-<cpu>.json]

Three faults, each on a small synthetic corpus (FPN width 0.25, crop 16 x 64, batch 2, one worker):

- ``lost``: a pretraining driver is SIGKILLed together with the local Ray cluster it started (head and
  workers gone, as when a KubeRay head pod is replaced), after a periodic checkpoint and a few more steps;
  ``--resume`` starts a new cluster. Measured: seconds from the kill to the first new training step, and
  the steps lost (done before the kill, after the last checkpoint: trained again).
- ``preempt``: SIGTERM to a pretraining driver (preemption). Measured: seconds from the signal to the
  checkpoint and to the driver's exit, the steps lost (0 when the checkpoint holds every step done), and
  from the resume's start to its first new step.
- ``sweep``: a sweep driver (two trials in turn) is SIGKILLed with its cluster once the first trial
  finished and the second has a checkpoint; ``--resume`` restores the Tune experiment on a new cluster.
  Measured: seconds from the kill to the first new trial step, and the trial steps lost.

Every "first new step" is the first one the resumed process wrote (the killed run's workers are reaped a
moment after the kill). Rerunning some scenarios (``--only``) keeps the other rows of ``--out``. Times
include this machine's Ray start-up (tens of seconds on the shared 2-core CPU): they are what an
operator waits, not the platform's own overhead alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from common import RESULTS, device_slug, environment, finish, write_json  # benchmarks/ is on sys.path
from octssl.corpus.synth import synthesize

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
GRID = (16, 64, 64)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "platform"), env.get("PYTHONPATH")]))
    return {**env, **extra}


def _start(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(args, env=_env(**env), start_new_session=True, stdout=out, stderr=subprocess.STDOUT)


def _wait(what: str, check: Callable[[], Any], proc: subprocess.Popen, log: Path, timeout: float = 900) -> Any:
    """Poll ``check`` until it returns something true; fail naming ``what`` if the process ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (found := check()) and found:
            return found
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: the process ended first: {log.read_text()[-1500:]}")
        time.sleep(0.05)
    raise TimeoutError(what)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _records(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return []


def _first_after(path: Path, moment: float, timeout: float = 900) -> dict[str, Any]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        new = [r for r in _records(path) if r.get("time", 0) > moment]
        if new:
            return new[0]
        time.sleep(0.05)
    raise TimeoutError(f"no record after the fault in {path}")


def _pretrain_args(corpus: Path, storage: Path, name: str, steps: int, ckpt_every: int) -> list[str]:
    sets = [f"data.corpus={corpus}", f"run.storage_path={storage}", f"run.name={name}", "data.crop=[16, 64]",
            "data.batch_size=2", "model.width=0.25", f"run.max_steps={steps}", f"run.ckpt_every={ckpt_every}",
            "run.log_every=1", "run.eval_every=1000", "scaling.workers=1"]
    return [sys.executable, "-m", "octssl", "pretrain", str(JOBS / "pretrain.yaml"),
            *[a for s in sets for a in ("--set", s)]]


def lost_cluster(root: Path, corpus: Path, steps: int, ckpt_every: int) -> dict[str, Any]:
    storage, name = root / "runs", "lost"
    run_dir = storage / name
    args = _pretrain_args(corpus, storage, name, steps, ckpt_every)
    driver = _start(args, root / "lost.log")

    def past_checkpoint() -> tuple[int, int] | None:
        snapshot, beat = _json(run_dir / "checkpoint_manager_snapshot.json"), _json(run_dir / "workers/rank0.json")
        try:
            ckpt = snapshot["latest_checkpoint_result"]["metrics"]["step"]
        except (TypeError, KeyError):
            return None
        return (ckpt, beat["step"]) if beat and beat["step"] >= ckpt + ckpt_every // 2 else None

    _wait("a checkpoint and a few steps more", past_checkpoint, driver, root / "lost.log")
    killed = time.time()
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and its local Ray cluster
    driver.wait()
    time.sleep(2.0)  # Ray's workers sit in process groups of their own: the reaper ends them within a second
    ckpt, done = past_checkpoint() or (0, 0)
    restarted = time.time()
    resumed = _start([*args, "--resume"], root / "lost-resume.log")
    first = _first_after(run_dir / "metrics.jsonl", restarted)
    resumed.wait(timeout=900)
    return {"fault": "SIGKILL driver + local Ray cluster (pretraining)", "checkpoint_step": ckpt,
            "steps_done_at_kill": done, "steps_lost": done - ckpt, "first_new_step": first["step"],
            "kill_to_first_new_step_s": round(first["time"] - killed, 1), "resume_exit": resumed.returncode}


def preempted(root: Path, corpus: Path, steps: int, ckpt_every: int) -> dict[str, Any]:
    storage, name = root / "runs", "preempt"
    run_dir = storage / name
    args = _pretrain_args(corpus, storage, name, steps, 1000)  # no periodic checkpoint: only the signal's
    driver = _start(args, root / "preempt.log")
    beat = _wait("a few steps", lambda: (b := _json(run_dir / "workers/rank0.json")) and b["step"] >= ckpt_every and b,
                 driver, root / "preempt.log")
    signalled = time.time()
    driver.send_signal(signal.SIGTERM)
    code = driver.wait(timeout=120)
    exited = time.time()
    with contextlib.suppress(ProcessLookupError):  # what is left of its local Ray, if anything
        os.killpg(driver.pid, signal.SIGKILL)
    marker = _json(run_dir / "preempted.json") or {}
    resume_started = time.time()
    resumed = _start([*args, "--resume"], root / "preempt-resume.log")
    first = _first_after(run_dir / "metrics.jsonl", resume_started)
    resumed.wait(timeout=900)
    return {"fault": "SIGTERM driver (pretraining)", "driver_exit": code, "steps_done_at_signal": beat["step"],
            "checkpoint_step": marker.get("step"),
            "steps_lost": None if "step" not in marker else max(0, beat["step"] - marker["step"]),
            "signal_to_checkpoint_s": None if "time" not in marker else round(marker["time"] - signalled, 1),
            "signal_to_exit_s": round(exited - signalled, 1), "first_new_step": first["step"],
            "resume_to_first_new_step_s": round(first["time"] - resume_started, 1),
            "resume_exit": resumed.returncode}


def sweep(root: Path, corpus: Path, steps: int, ckpt_every: int) -> dict[str, Any]:
    storage = root / "sweeps"
    raw = {"kind": "sweep", "corpus": str(corpus), "storage_path": str(storage), "name": "s", "tasks": ["ga"],
           "fractions": [0.5, 1.0], "inits": {"scratch": "scratch"}, "seeds": [0],
           "resources": {"cpus_per_trial": 1, "max_concurrent_trials": 1},
           "search": {"num_samples": 1, "steps": [steps], "grace_steps": steps, "lr": [0.003, 0.01],
                      "algorithm": "random"},
           "job": {"data": {"crop": [16, 64], "batch_size": 2, "crops_per_volume": 2, "val_volumes": 4},
                   "model": {"width": 0.25}, "optim": {"name": "adamw", "warmup_steps": 0},
                   "deepspeed": {"zero_stage": 0}, "run": {"eval_every": ckpt_every, "log_every": 1}},
           "figure_volumes": 2}
    config = root / "sweep.yaml"
    config.write_text(yaml.safe_dump(raw))
    trials = storage / "s" / "trials"
    args = [sys.executable, "-m", "octssl.jobs", str(config), "--resume-if-exists"]
    driver = _start(args, root / "sweep.log")

    def second_checkpointed() -> tuple[Path, int] | None:
        dirs = sorted(trials.iterdir()) if trials.is_dir() else []
        if len(dirs) < 2 or not (dirs[0] / "summary.json").exists() or (dirs[1] / "summary.json").exists():
            return None
        vals = _records(dirs[1] / "val.jsonl")
        return (dirs[1], vals[-1]["step"]) if vals else None

    trial, _ = _wait("a finished trial and a checkpointed one", second_checkpointed, driver, root / "sweep.log")
    time.sleep(2.0)  # Tune saves its experiment state every second: let it record that checkpoint
    killed = time.time()
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    time.sleep(2.0)  # the trial's process is reaped within a second: count what it did until then
    done = max((r["step"] for r in _records(trial / "metrics.jsonl")), default=0)
    restarted = time.time()
    resumed = _start(args, root / "sweep-resume.log")
    first = _first_after(trial / "metrics.jsonl", restarted)
    resumed.wait(timeout=900)
    return {"fault": "SIGKILL sweep driver + local Ray cluster", "trial_steps_done_at_kill": done,
            "trial_resumed_at_step": first["step"], "steps_lost": done - (first["step"] - 1),
            "kill_to_first_new_trial_step_s": round(first["time"] - killed, 1), "resume_exit": resumed.returncode}


SCENARIOS = {"lost": lost_cluster, "preempt": preempted, "sweep": sweep}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--ckpt-every", type=int, default=5)
    parser.add_argument("--only", default=",".join(SCENARIOS))
    parser.add_argument("--out", type=Path, default=None, help="default: results/recovery-<device>.json")
    args = parser.parse_args(argv)
    args.out = args.out or RESULTS / f"recovery-{device_slug(torch.device('cpu'))}.json"
    env = environment(torch.device("cpu"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="octssl-recovery-") as tmp:
        root = Path(tmp)
        corpus = root / "corpus"
        synthesize(corpus, volumes=20, grid=GRID, seed=3, labelled=1.0)
        for name in args.only.split(","):
            started = time.time()
            try:
                row = SCENARIOS[name](root, corpus, args.steps, args.ckpt_every)
                row["status"] = "ok"
            except Exception as err:  # one failed scenario stays in the table as failed
                row = {"fault": name, "status": "failed", "error": f"{type(err).__name__}: {err}"[:400]}
            row |= {"scenario": name, "wall_s": round(time.time() - started, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    ran = {row["scenario"] for row in rows}  # a rerun of some scenarios keeps the others' rows
    earlier = json.loads(args.out.read_text())["rows"] if args.out.is_file() else []
    rows = [r for r in earlier if r["scenario"] not in ran] + rows
    write_json(args.out, {"env": finish(env), "steps": args.steps, "ckpt_every": args.ckpt_every, "rows": rows})
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
