"""A run's ``summary.json``: the one record a training run leaves for its readers (the CLI, the sweep, the demo).

Written by :meth:`octssl.train.loop.Trainer.finish` from the run's :class:`~octssl.train.state.RunState`
(the one place where the state's names become the summary's), read back with :func:`read_run_summary`.
``schema_version`` is in the file; readers get a :class:`RunSummary`, never a plain dict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from octssl.train.state import RunState

SCHEMA_VERSION = 1


class RunSummary(BaseModel):
    """What a finished run reports. ``best_*`` describe the evaluation that wrote ``best/`` (for
    segmentation ``best_threshold`` is the threshold chosen there: the one a bundle of these weights ships)."""

    model_config = ConfigDict(extra="ignore")

    schema_version: int = SCHEMA_VERSION
    steps: int
    skipped_steps: int = 0
    first_loss: float | None = None
    final_loss: float | None = None
    best_metric: float | None = None
    best_metric_name: str
    best_step: int | None = None
    best_threshold: float | None = None
    val: dict[str, float] = {}
    weights: str | None = None
    best_weights: str | None = None
    wall_s: float = 0.0
    world_size: int = 1
    corpus_version: dict[str, Any] | None = None

    @classmethod
    def of_run(cls, state: RunState, *, metric: str, val: dict[str, float], weights: str | None,
               best_weights: str | None, wall_s: float, world_size: int,
               corpus_version: dict[str, Any] | None) -> RunSummary:
        """The summary of a run whose resumable state is ``state``."""
        return cls(steps=state.step, skipped_steps=state.skipped, first_loss=state.first_loss,
                   final_loss=state.last_loss, best_metric=state.best_metric, best_metric_name=metric,
                   best_step=state.best_step, best_threshold=state.best_val.get("threshold"), val=val,
                   weights=weights, best_weights=best_weights, wall_s=wall_s, world_size=world_size,
                   corpus_version=corpus_version)

    def write(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2))


def read_run_summary(text: str | bytes) -> RunSummary:
    """A summary.json's content as a :class:`RunSummary` (files written before ``schema_version`` read too)."""
    return RunSummary.model_validate(json.loads(text))
