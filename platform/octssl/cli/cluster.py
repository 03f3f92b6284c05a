"""`octssl submit` and `octssl jobs status | logs | stop`: jobs on a Ray cluster."""

from __future__ import annotations

import threading
from pathlib import Path

import typer

from octssl.cli import _ERRORS, EXIT_FAILED, _fail, app, console
from octssl.cluster import client as jobs_client

# ---------------------------------------------------------------- Ray jobs (submit, status, logs, stop)
jobs_app = typer.Typer(no_args_is_help=True, help="Follow jobs on a Ray cluster: status, logs, stop.")
app.add_typer(jobs_app, name="jobs")

# Ray's own order (`ray job submit`): the flag, then RAY_API_SERVER_ADDRESS, then RAY_ADDRESS, then the local head.
_ADDRESS = typer.Option(
    "http://127.0.0.1:8265", "--address", "-a", envvar=["RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"],
    help="Ray dashboard URL of the cluster head (env RAY_API_SERVER_ADDRESS, else RAY_ADDRESS)",
)


_SUBMIT_CONFIG = typer.Argument(..., help="job YAML inside this checkout (see jobs/)")
_SUBMIT_SET = typer.Option([], "--set", help="override a config key on the cluster (repeatable)")
_SUBMIT_PORT = typer.Option(None, "--metrics-port", help="workers serve Prometheus /metrics on PORT+rank")
_SUBMIT_WAIT = typer.Option(False, "--wait", help="stream the job's logs until it ends; exit 1 unless SUCCEEDED")
_SUBMIT_TIMEOUT = typer.Option(None, "--timeout", help="with --wait: give up after SECONDS")


@app.command()
def submit(
    config: Path = _SUBMIT_CONFIG,
    address: str = _ADDRESS,
    set_: list[str] = _SUBMIT_SET,
    metrics_port: int | None = _SUBMIT_PORT,
    wait: bool = _SUBMIT_WAIT,
    timeout: float | None = _SUBMIT_TIMEOUT,
) -> None:
    """Submit `python -m octssl.jobs CONFIG` to a Ray cluster, uploading this checkout as the working dir."""

    extra = ["--metrics-port", str(metrics_port)] if metrics_port is not None else []
    try:
        job_id = jobs_client.submit(config, address, overrides=set_, extra_args=extra)
        print(job_id)
        if not wait:
            console.print(f"submitted; follow with `octssl jobs logs {job_id} --address {address}`")
            return
        state = _stream_until_done(job_id, address, timeout)
    except _ERRORS as err:
        _fail(err)
    console.print(f"job {job_id}: {state}")
    if state != "SUCCEEDED":
        raise typer.Exit(EXIT_FAILED)


def _stream_until_done(job_id: str, address: str, timeout: float | None) -> str:
    """Print the job's logs as they come (stdout) until it ends or `timeout` passes; its final state."""


    def stream() -> None:
        for chunk in jobs_client.follow(job_id, address):
            print(chunk, end="", flush=True)

    reader = threading.Thread(target=stream, daemon=True)  # ends with the job's log, or with this process
    reader.start()
    state = jobs_client.wait(job_id, address, timeout_s=timeout)  # errors (token, address) surface here
    reader.join(timeout=30)
    return state


@jobs_app.command("status")
def jobs_status(job_id: str, address: str = _ADDRESS) -> None:
    """Print a job's state (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) and the cluster's message."""

    try:
        details = jobs_client.info(job_id, address)
    except _ERRORS as err:
        _fail(err)
    print(details["status"])
    if details["message"]:
        console.print(details["message"])


_FOLLOW = typer.Option(False, "--follow", "-f", help="keep printing new output until the job ends")


@jobs_app.command("logs")
def jobs_logs(job_id: str, address: str = _ADDRESS, follow: bool = _FOLLOW) -> None:
    """Print everything the job's driver has written so far (with --follow: and what it writes next)."""

    try:
        if follow:
            for chunk in jobs_client.follow(job_id, address):
                print(chunk, end="", flush=True)
            return
        text = jobs_client.logs(job_id, address)
    except _ERRORS as err:
        _fail(err)
    print(text, end="")


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: str = _ADDRESS) -> None:
    """Ask the cluster to stop a job."""

    try:
        stopped = jobs_client.stop(job_id, address)
    except _ERRORS as err:
        _fail(err)
    console.print(f"job {job_id}: " + ("stop requested" if stopped else "already finished"))
