"""Preemption: a SIGTERM becomes a checkpoint at the next step and a clean stop, within a bounded time.

Kubernetes evicts a pod (node drain, spot reclaim, a re-applied RayJob) by running its preStop hook,
then sending SIGTERM to its first process and SIGKILL ``terminationGracePeriodSeconds`` later. The
process that hears the signal is rarely the one that trains, so the signal is turned into a *stop
request* that every rank can see:

- the driver (``octssl pretrain``, ``python -m octssl.jobs``): :func:`on_sigterm` posts a request for its
  run in Ray's key-value store (the GCS) and exits at the latest ``grace_s()`` seconds later;
- a Ray pod's preStop hook, ``python -m octssl.train.preempt``: posts a request for every run on the
  cluster and gives them ``OCTSSL_PREEMPT_WAIT_S`` (default ``grace_s()``) to checkpoint, before ``ray stop``;
- a run without Ray (``run_single_process``): :func:`on_sigterm` sets an in-process flag.

Rank 0 looks for a request (at most every :data:`POLL_S`), every rank learns it through the step's own
all-reduce, and the Trainer saves a checkpoint at that step, writes ``RUN_DIR/preempted.json`` and
returns: ``--resume`` continues from exactly that step. A request older than the run's start is ignored,
so a run resumed on a cluster that survived is not stopped again. A Ray worker process that gets SIGTERM
itself exits at once (Ray's own handler; a training thread cannot replace it): that run restarts from
its last periodic checkpoint, like after a SIGKILL.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

GRACE_ENV = "OCTSSL_PREEMPT_GRACE_S"
DEFAULT_GRACE_S = 20.0  # well under Kubernetes' default 30 s grace: the checkpoint must land before SIGKILL
POLL_S = 0.5  # rank 0 reads the request at most this often (one GCS read)
MARKER = "preempted.json"  # in RUN_DIR: the step a preempted run stopped at
_ALL = "*"  # a request for every run (a pod's preStop hook)
_KEY = "octssl:preempt:{}"

_local_request: float | None = None  # a request in this process (no Ray): its time


def grace_s() -> float:
    """Seconds from the signal to a forced exit (``OCTSSL_PREEMPT_GRACE_S``, default 20)."""
    try:
        return max(1.0, float(os.environ.get(GRACE_ENV, DEFAULT_GRACE_S)))
    except ValueError:
        return DEFAULT_GRACE_S


def _kv() -> Any | None:
    """Ray's internal key-value store when this process is connected to Ray, else None. It is the one
    store every process of the cluster reaches (driver, workers, a hook in any pod) without a new service."""
    import ray

    if not ray.is_initialized():
        return None
    from ray.experimental import internal_kv

    return internal_kv


def request(run: str = _ALL) -> None:
    """Ask ``run`` (or every run on the cluster) to checkpoint and stop."""
    global _local_request
    _local_request = time.time()
    kv = _kv()
    if kv is not None:
        kv._internal_kv_put(_KEY.format(run), str(_local_request).encode(), overwrite=True)


def requested(run: str, since: float) -> bool:
    """Whether a stop was requested for ``run`` (or every run) after ``since`` (the run's start)."""
    if _local_request is not None and _local_request > since:
        return True
    kv = _kv()
    if kv is None:
        return False
    for key in (_KEY.format(run), _KEY.format(_ALL)):
        value = kv._internal_kv_get(key)
        if value is not None and float(value) > since:
            return True
    return False


class Poll:
    """Rank 0's throttled view of :func:`requested` (a GCS read costs ~1 ms; a step may take less)."""

    def __init__(self, run: str, since: float, every: float = POLL_S) -> None:
        self.run, self.since, self.every = run, since, every
        self.last: float | None = None

    def __call__(self) -> bool:
        now = time.monotonic()
        if self.last is not None and now - self.last < self.every:
            return False
        self.last = now
        return requested(self.run, self.since)


def write_marker(run_dir: Path, step: int, asked: float | None) -> dict[str, Any]:
    """Record where the run stopped (``RUN_DIR/preempted.json``) and say it in the log, one line."""
    record = {"step": step, "time": time.time(), "after_request_s": None if asked is None else time.time() - asked}
    (run_dir / MARKER).write_text(json.dumps(record))
    print(f"{run_dir}: preempted: checkpoint at step {step} saved, stopping cleanly; continue with --resume",
          file=sys.stderr, flush=True)
    return record


def read_marker(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def asked_at(run: str) -> float | None:
    """When the newest request that concerns ``run`` was made (for the marker's timing), if known."""
    times = [_local_request] if _local_request is not None else []
    kv = _kv()
    if kv is not None:
        times += [float(v) for k in (_KEY.format(run), _KEY.format(_ALL)) if (v := kv._internal_kv_get(k))]
    return max(times) if times else None


@contextmanager
def on_sigterm(run: str, what: str) -> Iterator[None]:
    """While the block runs, SIGTERM asks ``run`` to checkpoint and stop; if the block has not ended
    ``grace_s()`` later, the process exits (status 143) saying so. Outside the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    deadline: list[threading.Timer] = []

    def handle(signum: int, frame: Any) -> None:
        grace = grace_s()
        print(f"{what}: SIGTERM: asking run {run} to checkpoint and stop (at most {grace:g} s)",
              file=sys.stderr, flush=True)
        request(run)
        timer = threading.Timer(grace, _give_up, args=(what, grace))
        timer.daemon = True
        timer.start()
        deadline.append(timer)

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        for timer in deadline:
            timer.cancel()


def _give_up(what: str, grace: float) -> None:
    print(f"{what}: no checkpoint within {grace:g} s of SIGTERM: exiting; the run continues from its last "
          "periodic checkpoint with --resume", file=sys.stderr, flush=True)
    os._exit(128 + signal.SIGTERM)


def main() -> int:
    """The preStop hook of a Ray pod: ask every run on the cluster to checkpoint and stop, then give them
    ``OCTSSL_PREEMPT_WAIT_S`` seconds (default ``grace_s()``) before the hook's next command (``ray stop``)."""
    import ray

    try:
        ray.init(address="auto", log_to_driver=False, logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError) as err:  # no cluster: nothing trains here
        print(f"octssl preempt: no Ray cluster to ask ({err})", file=sys.stderr)
        return 0
    request(_ALL)
    time.sleep(min(grace_s(), float(os.environ.get("OCTSSL_PREEMPT_WAIT_S", grace_s()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
