"""The run's resumable state, written once: what a checkpoint saves besides the weights, and the cadence
of logging, evaluation and checkpoints."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RunState:
    """Step, data position, skipped steps, losses and the best validation metric of one rank.

    ``step`` counts optimiser steps taken, skipped non-finite steps included (they consume data);
    ``data`` is the training data's ``state_dict()`` (epoch and step within it). RNG states are added
    by :func:`octssl.train.checkpoint.save_state` when the state is written.
    """

    step: int = 0
    data: dict[str, int] = field(default_factory=lambda: {"epoch": 0, "step": 0})
    skipped: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    best_metric: float | None = None
    best_step: int | None = None  # the evaluation that wrote best/
    best_val: dict[str, float] = field(default_factory=dict)  # its val metrics (segmentation: its threshold)
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunState:
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        return cls(**known)


@dataclass(frozen=True)
class Cadence:
    """When periodic work is due: every ``every`` steps, and always at the last step."""

    total_steps: int

    def due(self, step: int, every: int) -> bool:
        return step % every == 0 or step == self.total_steps
