"""The run's state written once (RunState round trip through a checkpoint), the cadence helper, and how a
restart after a failure is told from a deliberate --resume."""

from __future__ import annotations

import uuid
from pathlib import Path

from octssl.observe.metrics import TrainMetrics
from octssl.train import checkpoint as ckpt
from octssl.train.loop import _started_before
from octssl.train.state import Cadence, RunState


def test_run_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    state = RunState(step=7, data={"epoch": 2, "step": 3}, skipped=1, first_loss=0.9, last_loss=0.4,
                     best_metric=0.61, world_size=2)
    ckpt.save_state(tmp_path, 1, state)
    assert ckpt.load_state(tmp_path, 1) == state
    # after a change of world size, a rank without a file of its own takes rank 0's position
    ckpt.save_state(tmp_path, 0, RunState(step=9))
    assert ckpt.load_state(tmp_path, 5).step == 9


def test_cadence_is_every_n_and_the_last_step() -> None:
    cadence = Cadence(total_steps=10)
    assert [s for s in range(1, 11) if cadence.due(s, 4)] == [4, 8, 10]
    assert [s for s in range(1, 11) if cadence.due(s, 100)] == [10]


def test_a_restart_is_told_from_a_deliberate_resume() -> None:
    attempt = uuid.uuid4().hex
    assert _started_before(attempt, 0) is False  # first start of rank 0 in this launch
    assert _started_before(attempt, 1) is False
    assert _started_before(attempt, 0) is True  # Ray started rank 0 again: a restart after a failure
    assert _started_before("", 0) is False  # no launch token (single process): never a restart

    counted = TrainMetrics(rank=0, run=f"restart-{attempt}")
    counted.restart()
    resumed = TrainMetrics(rank=0, run=f"resume-{attempt}")
    resumed.restart(count=False)
    assert counted.values()["octssl_worker_restarts_total"] == 1
    assert resumed.values()["octssl_worker_restarts_total"] == 0
