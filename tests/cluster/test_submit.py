"""`octssl submit` / `octssl jobs`: jobs on a real local Ray head (loopback), and clear errors without one."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from octssl.cluster import client as jobs_client
from octssl.cluster.client import JobSubmitError

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


TOKEN = uuid.uuid4().hex  # the head runs with token authentication, as Ray 2.60 local clusters do


def _env(token: str = TOKEN) -> dict[str, str]:
    # The job's `python` must be this venv's: put it first on the head's PATH.
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}


@pytest.fixture(scope="module")
def ray_head(monkeypatch_module):
    """A Ray head of our own on loopback ports (every port chosen free), stopped by its process group."""
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip("the ray CLI is not installed in this environment")
    temp_dir = tempfile.mkdtemp(prefix="octssl-ray-", dir="/tmp")  # short: Ray's unix sockets need it
    gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env = _free_ports(7)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={runtime_env}", "--num-cpus=1", f"--temp-dir={temp_dir}",
           "--disable-usage-stats"]
    log = open(Path(temp_dir) / "head.log", "w")  # noqa: SIM115 - closed in teardown
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    monkeypatch_module.setenv("RAY_AUTH_TOKEN", TOKEN)  # what the in-process client sends
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers (401 when ~/.ray/auth_token made it a token-auth cluster)
            except OSError:
                pass
            if head.poll() is not None or time.time() > deadline:
                raise AssertionError(f"ray head did not start: {(Path(temp_dir) / 'head.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield address
    finally:
        _stop_group(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _stop_group(proc: subprocess.Popen) -> None:
    """End the head and every process it started (its own session: pgid == its pid).

    After a short grace, SIGKILL: `ray start --block` may spend ~15 s in its own shutdown after jobs ran.
    """
    for sig, wait_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait_s
        while time.time() < deadline:
            if not _group_alive(proc.pid):
                proc.wait(timeout=5)
                return
            proc.poll()
            time.sleep(0.3)


def _group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process remains in the group."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _octssl(*args: str, timeout: float = 120, token: str = TOKEN) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "octssl"), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=_env(token))


def test_tiny_job_succeeds_with_the_checkout_shipped(ray_head):
    """A job submitted through the client imports octssl from the uploaded package and SUCCEEDs."""
    command = "python -c \"import octssl.observe.metrics as m; print('octssl job ok', m.__file__)\""
    job_id = jobs_client.submit_command(command, ray_head)
    assert jobs_client.wait(job_id, ray_head, timeout_s=90, poll_s=0.5) == "SUCCEEDED", jobs_client.logs(job_id, ray_head)
    text = jobs_client.logs(job_id, ray_head)
    assert "octssl job ok" in text
    module_path = text.split("octssl job ok", 1)[1].split()[0]
    assert not module_path.startswith(str(REPO)), f"octssl came from the local checkout, not the upload: {module_path}"
    assert jobs_client.status(job_id, ray_head) == "SUCCEEDED"
    assert jobs_client.stop(job_id, ray_head) is False  # already finished


def test_submit_runs_octssl_jobs_and_reports_its_failure(ray_head):
    """`octssl submit --wait` runs `python -m octssl.jobs CONFIG` on the cluster; a bad corpus fails clearly."""
    done = _octssl("submit", "jobs/pretrain.yaml", "--address", ray_head, "--set", "data.corpus=/nonexistent/corpus",
                   "--wait", "--timeout", "90")
    assert done.returncode == 1, done.stdout + done.stderr
    job_id = done.stdout.splitlines()[0].strip()
    assert job_id.startswith("raysubmit_")
    assert "/nonexistent/corpus" in done.stdout  # the job's own error, printed with its logs
    assert "FAILED" in done.stderr
    status = _octssl("jobs", "status", job_id, "--address", ray_head)
    assert status.returncode == 0 and status.stdout.strip() == "FAILED", status.stderr
    logs = _octssl("jobs", "logs", job_id, "--address", ray_head)
    assert "python -m octssl.jobs jobs/pretrain.yaml --set data.corpus=/nonexistent/corpus" in logs.stdout


def test_logs_follow_streams_until_the_job_ends(ray_head):
    """`octssl jobs logs ID --follow` prints output as it comes and returns when the job ends."""
    command = "python -c \"import time; print('first', flush=True); time.sleep(4); print('second', flush=True)\""
    job_id = jobs_client.submit_command(command, ray_head)
    done = _octssl("jobs", "logs", job_id, "--address", ray_head, "--follow")
    assert done.returncode == 0, done.stderr
    assert done.stdout.index("first") < done.stdout.index("second"), done.stdout
    assert jobs_client.status(job_id, ray_head) == "SUCCEEDED"  # it returned because the job had ended


def test_wrong_token_is_a_clear_error(ray_head):
    done = _octssl("jobs", "status", "raysubmit_x", "--address", ray_head, token="not-the-token")
    assert done.returncode == 1 and "rejected the token" in done.stderr and "RAY_AUTH_TOKEN" in done.stderr
    assert "Traceback" not in done.stderr


def test_unknown_job_id_is_a_clear_error(ray_head):
    with pytest.raises(JobSubmitError, match="raysubmit_doesnotexist"):
        jobs_client.status("raysubmit_doesnotexist", ray_head)


def test_unreachable_address_is_a_clear_error_without_traceback():
    (port,) = _free_ports(1)
    address = f"http://127.0.0.1:{port}"
    for args in (["submit", "jobs/pretrain.yaml"], ["jobs", "status", "raysubmit_x"], ["jobs", "logs", "raysubmit_x"],
                 ["jobs", "stop", "raysubmit_x"]):
        done = _octssl(*args, "--address", address, timeout=60)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "cannot reach the Ray dashboard" in done.stderr and str(port) in done.stderr
        assert "Traceback" not in done.stderr


def test_config_outside_the_checkout_is_refused(tmp_path):
    config = tmp_path / "pretrain.yaml"
    config.write_text("kind: pretrain\n")
    with pytest.raises(JobSubmitError, match="inside the uploaded working directory"):
        jobs_client.submit(config, "http://127.0.0.1:9")
    with pytest.raises(JobSubmitError, match="not found"):
        jobs_client.submit(tmp_path / "missing.yaml", "http://127.0.0.1:9")


def test_runtime_env_ships_the_checkout_without_bulk():
    env = jobs_client.runtime_env(REPO)
    assert env["working_dir"] == str(REPO)
    assert {".venv", "runs", ".git"} <= set(env["excludes"])
    assert env["py_modules"] == [str(REPO / "platform" / "octssl")]
    assert jobs_client.entrypoint("jobs/pretrain.yaml", ["run.name=a b"]) == \
        "python -m octssl.jobs jobs/pretrain.yaml --set 'run.name=a b'"
