"""A driver that started a local Ray and is then SIGKILLed leaves no Ray process behind (real Ray, real
signals): the watchdog of ``octssl.cluster.reaper`` kills the agents that would otherwise outlive it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from octssl.cluster.reaper import descendants, reap

DRIVER = """
import os, time
import ray
from octssl.cluster.local import ray_up

ray_up()

@ray.remote
def pid():
    return os.getpid()

print("READY", ray.get(pid.remote()), flush=True)
time.sleep(600)
"""


def alive(recorded: dict[int, float]) -> list[str]:
    left = []
    for pid, started in recorded.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{pid} {process.name()}")
        except psutil.Error:
            continue
    return left


@pytest.mark.timeout(300)
def test_a_killed_driver_leaves_no_ray_process_behind() -> None:
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, start_new_session=True)
    family: dict[int, float] = {}
    try:
        assert driver.stdout.readline().startswith("READY"), "the driver did not start Ray"
        time.sleep(2)  # the agents are up by now
        family = descendants(driver.pid)
        names = " ".join(psutil.Process(pid).name() for pid in family if psutil.pid_exists(pid))
        assert "raylet" in names, names
        os.kill(driver.pid, signal.SIGKILL)  # the driver alone, as the OOM killer or `kill -9 PID` would
        driver.wait(timeout=30)
        deadline = time.time() + 60
        while alive(family) and time.time() < deadline:
            time.sleep(0.5)
        assert alive(family) == [], "left behind after the driver died"
    finally:
        driver.kill()
        reap(family)  # whatever this test started, should the assertion have failed
