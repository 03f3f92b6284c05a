"""Submit octssl jobs to a Ray cluster and follow them through Ray's Job Submission API (dashboard port).

The job runs `python -m octssl.jobs CONFIG [--set ...]` on the cluster, with this checkout uploaded as the
job's working directory (minus .venv, runs, .git and other bulky folders) and `platform/octssl` shipped as
a py_module, so the cluster runs the code you have here even when its image holds an older octssl.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from octssl.errors import OctsslError

EXCLUDES = [".venv", "runs", ".git", "**/__pycache__", ".pytest_cache", ".ruff_cache", "benchmarks/results",
            "*.zarr", "*.tar"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobSubmitError(OctsslError):
    """A Ray cluster cannot be reached, refuses a job, or does not know a job id."""


def repo_root() -> Path:
    """The checkout holding this package (platform/octssl/ -> repo), or the working directory if installed."""
    candidate = Path(__file__).resolve().parents[2]
    return candidate if (candidate / "pyproject.toml").is_file() else Path.cwd()


def auth_token() -> str | None:
    """Ray's token for clusters with token authentication (Ray 2.52+): $RAY_AUTH_TOKEN, the file named by
    $RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token, where `ray start`/`ray.init` keep it on this machine."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if path.is_file():
        return path.read_text().strip() or None
    return None


def _client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    # Sent explicitly: Ray reads RAY_AUTH_MODE once per process, so setting it here would come too late.
    # A cluster without token authentication ignores the header.
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as err:  # ray raises ConnectionError, ValueError or its own errors, by version
        if _is_auth_error(err):
            raise JobSubmitError(_auth_message(address, token, err)) from None
        raise JobSubmitError(
            f"cannot reach the Ray dashboard at {address}: {_first_line(err)} "
            "(is the head running and its dashboard port, usually 8265, forwarded?)"
        ) from None


def _is_auth_error(err: Exception) -> bool:
    text = str(err).lower()
    # "401" as a status code, not inside a number (a port such as 34019 is no authentication failure)
    return "authentication" in text or "unauthorized" in text or re.search(r"\b401\b", text) is not None


def _auth_message(address: str, token: str | None, err: Exception) -> str:
    problem = "rejected the token sent" if token else "requires a token and none was found"
    return (f"the Ray cluster at {address} {problem} ({_first_line(err)}): set RAY_AUTH_TOKEN, or "
            "RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token (on Kubernetes: the cluster's token Secret)")


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _raise(err: Exception) -> None:
    raise err


def _call(address: str, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except JobSubmitError:
        raise
    except Exception as err:
        if _is_auth_error(err):
            raise JobSubmitError(_auth_message(address, auth_token(), err)) from None
        raise JobSubmitError(f"{address}: {what} failed: {_first_line(err)}") from None


def entrypoint(config: str, overrides: list[str] | tuple[str, ...] = (), extra: list[str] | tuple[str, ...] = ()) -> str:
    """The shell command a job runs for CONFIG (a path relative to the uploaded working directory)."""
    words = ["python", "-m", "octssl.jobs", config]
    for item in overrides:
        words += ["--set", item]
    words += list(extra)
    return shlex.join(words)


def runtime_env(working_dir: Path | None = None) -> dict[str, Any]:
    """The job's runtime_env: the checkout as working_dir and the package as a py_module."""
    root = (working_dir or repo_root()).resolve()
    env: dict[str, Any] = {"working_dir": str(root), "excludes": list(EXCLUDES)}
    package = root / "platform" / "octssl"
    if package.is_dir():
        env["py_modules"] = [str(package)]
    return env


def submit(config: str | Path, address: str, *, overrides: list[str] | tuple[str, ...] = (),
           extra_args: list[str] | tuple[str, ...] = (), working_dir: Path | None = None,
           submission_id: str | None = None) -> str:
    """Submit `python -m octssl.jobs CONFIG` as a Ray job and return its submission id.

    CONFIG must lie inside the working directory (it is uploaded with it); the job gets its relative path.
    """
    root = (working_dir or repo_root()).resolve()
    config_path = Path(config)
    resolved = (config_path if config_path.is_absolute() else Path.cwd() / config_path).resolve()
    if not resolved.is_file():
        raise JobSubmitError(f"{config}: config file not found")
    try:
        relative = resolved.relative_to(root).as_posix()
    except ValueError:
        raise JobSubmitError(f"{config}: must lie inside the uploaded working directory {root}") from None
    return submit_command(entrypoint(relative, overrides, extra_args), address, working_dir=root,
                          submission_id=submission_id, metadata={"octssl_config": relative})


def submit_command(command: str, address: str, *, working_dir: Path | None = None,
                   submission_id: str | None = None, metadata: dict[str, str] | None = None) -> str:
    """Submit any shell command as a Ray job with octssl's runtime_env; returns the submission id."""
    client = _client(address)
    return _call(address, "job submission", client.submit_job, entrypoint=command,
                 runtime_env=runtime_env(working_dir), submission_id=submission_id, metadata=metadata)


def status(job_id: str, address: str) -> str:
    """The job's state: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    client = _client(address)
    return str(_call(address, f"status of {job_id}", client.get_job_status, job_id).value)


def info(job_id: str, address: str) -> dict[str, Any]:
    """State, message, entrypoint and times of one job."""
    client = _client(address)
    details = _call(address, f"details of {job_id}", client.get_job_info, job_id)
    return {"job_id": job_id, "status": str(details.status.value), "message": details.message,
            "entrypoint": details.entrypoint, "start_time": details.start_time, "end_time": details.end_time}


def logs(job_id: str, address: str) -> str:
    """Everything the job's driver printed so far."""
    client = _client(address)
    return str(_call(address, f"logs of {job_id}", client.get_job_logs, job_id))


def follow(job_id: str, address: str) -> Iterator[str]:
    """The job's log as the driver writes it, chunk by chunk, from the start until the job ends
    (Ray's log-tailing websocket, driven by an event loop of its own)."""

    client = _client(address)
    stream = client.tail_job_logs(job_id)
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                chunk = loop.run_until_complete(stream.__anext__())
            except StopAsyncIteration:
                return
            except Exception as err:  # the job is unknown, the token wrong, the connection lost
                _call(address, f"logs of {job_id}", _raise, err)
            yield str(chunk)
    finally:
        loop.run_until_complete(stream.aclose())
        loop.close()


def stop(job_id: str, address: str) -> bool:
    """Ask the cluster to stop the job; False when it had already finished."""
    client = _client(address)
    return bool(_call(address, f"stop of {job_id}", client.stop_job, job_id))


def wait(job_id: str, address: str, *, timeout_s: float | None = None, poll_s: float = 1.0) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED and return that state."""
    client = _client(address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        state = str(_call(address, f"status of {job_id}", client.get_job_status, job_id).value)
        if state in TERMINAL:
            return state
        if deadline is not None and time.monotonic() > deadline:
            raise JobSubmitError(f"{address}: job {job_id} still {state} after {timeout_s:g} s")
        time.sleep(poll_s)
