"""Ray at the edges: join or start a cluster, check it fits a request, and say why a remote call failed.

Both the training launcher and the sweep start Ray through :func:`ray_up`; every error that comes back
from a Ray worker, task or trial is reduced to one line by :func:`root_cause`.
"""

from __future__ import annotations

import os
import sys

from octssl.cluster import reaper
from octssl.errors import ConfigError

DASHBOARD_ENV = "OCTSSL_RAY_DASHBOARD"  # "1": a local Ray starts its dashboard (`--dashboard`)
WORKER_LOGS_ENV = "OCTSSL_WORKER_LOGS"  # "1": workers' stdout/stderr are shown here (`--worker-logs`)
#: what keeps Ray (usage statistics) and MLflow (telemetry) from phoning home; hospital networks expect it
NO_TELEMETRY = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


def telemetry_off() -> None:
    """Set :data:`NO_TELEMETRY` in this process's environment (inherited by the local Ray and its workers)
    where the user has not set the variable: a deliberate opt-in (``RAY_USAGE_STATS_ENABLED=1``) stands."""
    for name, value in NO_TELEMETRY.items():
        os.environ.setdefault(name, value)


def ray_up() -> dict[str, float]:
    """Join the cluster at RAY_ADDRESS, or start a local Ray sized to this machine; its resources."""
    import ray

    if not ray.is_initialized():
        telemetry_off()
        worker_logs = os.environ.get(WORKER_LOGS_ENV) == "1"
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=worker_logs)
        else:
            dashboard = os.environ.get(DASHBOARD_ENV) == "1"
            context = ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=dashboard,
                               dashboard_host="127.0.0.1", log_to_driver=worker_logs)
            if dashboard and context.dashboard_url:
                print(f"Ray dashboard: http://{context.dashboard_url}", file=sys.stderr, flush=True)
            reaper.guard()  # the agents of a local Ray outlive a killed driver: reap them
    return ray.cluster_resources()


def require(what: str, cpus: float, gpus: float) -> dict[str, float]:
    """Start/join Ray and check it has ``cpus``/``gpus`` in all; ConfigError naming ``what`` asked for more."""
    have = ray_up()
    if cpus > have.get("CPU", 0.0) or gpus > have.get("GPU", 0.0):
        raise ConfigError(f"{what} asks {cpus:g} CPU, {gpus:g} GPU but the cluster has {have.get('CPU', 0):g} CPU, "
                          f"{have.get('GPU', 0):g} GPU")
    return have


def root_cause(err: BaseException) -> str:
    """The last non-empty line of the innermost cause: what went wrong, without Ray's wrapping."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
