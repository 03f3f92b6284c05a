"""Reap what a local Ray leaves behind when its driver dies: a watchdog that kills the driver's descendants.

Why: a local Ray started by ``ray.init()`` shares the driver's fate only in part. When the driver is
killed (SIGKILL, OOM killer), the GCS server and the raylet follow it, but the dashboard and runtime-env
agents the raylet started live on, reparented to init, and ignore SIGTERM; Ray workers sit in process
groups of their own. :func:`guard` starts a watchdog in a session of its own (a signal to the driver's
process group does not reach it) that records the driver's descendants (pid and start time) every
second. When the driver is gone (its end of a pipe closes, however it ended) the watchdog SIGKILLs every
recorded process that is still alive with the same start time (so a reused pid is never hit), then exits.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
from pathlib import Path

import psutil

INTERVAL_S = 1.0
_watchdog: subprocess.Popen | None = None  # held for the driver's life: its stdin pipe is the heartbeat


def guard() -> subprocess.Popen:
    """Start (once per process) the watchdog that reaps this process's descendants after it dies."""
    global _watchdog
    if _watchdog is None or _watchdog.poll() is not None:
        package_root = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
        _watchdog = subprocess.Popen(
            [sys.executable, "-m", "octssl.cluster.reaper", str(os.getpid())], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "PYTHONPATH": path},
        )
    return _watchdog


def descendants(pid: int) -> dict[int, float]:
    """``{pid: start time}`` of every living descendant of ``pid`` (empty when it is gone)."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return {}
    found = {}
    for child in children:
        try:
            found[child.pid] = child.create_time()
        except psutil.Error:
            continue
    return found


def reap(recorded: dict[int, float]) -> list[int]:
    """SIGKILL each recorded process still alive with its recorded start time; returns the pids killed."""
    killed = []
    for pid, started in recorded.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == started:
                process.kill()
                killed.append(pid)
        except psutil.Error:
            continue
    return killed


def watch(driver: int, heartbeat: int = 0, interval: float = INTERVAL_S) -> list[int]:
    """Record ``driver``'s descendants until ``heartbeat`` (a pipe's read end) reaches end-of-file; reap them."""
    recorded: dict[int, float] = {}
    while True:
        alive = {pid: t for pid, t in recorded.items() if psutil.pid_exists(pid)}
        recorded = {**alive, **descendants(driver)}
        recorded.pop(os.getpid(), None)  # the watchdog is the driver's child too
        readable, _, _ = select.select([heartbeat], [], [], interval)
        if readable and not os.read(heartbeat, 4096):
            return reap(recorded)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
