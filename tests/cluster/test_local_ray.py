"""`--dashboard` / `--worker-logs`: a local Ray started by octssl.cluster.local.ray_up with its dashboard, and the
workers' output shown by the driver (in a subprocess: Ray is process-global)."""

from __future__ import annotations

import os
import subprocess
import sys

# Starts Ray through ray_up, has a worker print, and asks the dashboard it announced for its version.
_DRIVER = r"""
import time, urllib.error, urllib.request
import ray
from octssl.cluster.local import ray_up
ray_up()

@ray.remote
def hello():
    print("hello from a ray worker", flush=True)

ray.get(hello.remote())

@ray.remote
def telemetry():
    import os
    return {k: os.environ.get(k) for k in ("RAY_USAGE_STATS_ENABLED", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")}

from ray._common.usage import usage_lib
print("usage stats enabled", usage_lib.usage_stats_enabled(), flush=True)
print("worker telemetry env", sorted(ray.get(telemetry.remote()).items()), flush=True)
# the address ray_up announced (ray.init returned it; no public getter afterwards)
url = ray._private.worker.global_worker.node.address_info["webui_url"]
try:
    answer = urllib.request.urlopen(f"http://{url}/api/version", timeout=10).status
except urllib.error.HTTPError as err:  # 401: token authentication, still the dashboard answering
    answer = err.code
print("dashboard answered", answer, flush=True)
time.sleep(2)  # the log monitor forwards worker output about once a second
"""


def test_local_ray_with_dashboard_and_worker_logs_phones_no_one():
    """Started without any telemetry variable set, ray_up's Ray reports no usage statistics and its workers
    (where MLflow would run) inherit the telemetry opt-outs."""
    from octssl.cluster.local import NO_TELEMETRY

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and k not in NO_TELEMETRY}
    env.update(OCTSSL_RAY_DASHBOARD="1", OCTSSL_WORKER_LOGS="1")
    done = subprocess.run([sys.executable, "-c", _DRIVER], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    announced = [line for line in done.stderr.splitlines() if line.startswith("Ray dashboard: http://127.0.0.1:")]
    assert announced, done.stderr[-3000:]
    assert any(line in done.stdout for line in ("dashboard answered 200", "dashboard answered 401")), done.stdout
    assert "hello from a ray worker" in done.stdout + done.stderr
    assert "usage stats enabled False" in done.stdout, done.stdout
    assert f"worker telemetry env {sorted(NO_TELEMETRY.items())}" in done.stdout, done.stdout
