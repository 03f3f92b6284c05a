"""A sweep's ``summary.json``: the one record a sweep leaves for its readers (the report, the bundles, the CLI,
the demo, MLflow), with the cells and chosen trials it holds.

Written by :func:`octssl.tune.sweep.run_sweep` (built by :func:`octssl.tune.results.summarise`), read back with
:func:`read_sweep_summary`. ``schema_version`` is in the file; readers get a :class:`SweepSummary`. Kept light
(pydantic, no torch): reading a finished sweep's tables needs none of the machinery that made them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from octssl.apply.bundle import SplitMetrics
from octssl.errors import ConfigError

SCHEMA_VERSION = 1


class ChosenTrial(BaseModel):
    """A trial chosen for one group (cell x seed) on the val split: its hyperparameters, its best pooled val
    Dice and the probability threshold it took there (a cell's ``best_config`` and ``seed_configs``)."""

    trial: str
    seed: int
    lr: float
    weight_decay: float
    steps: int
    val_dice_pooled: float
    threshold: float


class TrialTest(SplitMetrics):
    """The bundled trial's own test metrics, at the threshold it chose on val (a cell's ``best_test``: what
    the task's bundle reports)."""

    trial: str


class SweepCell(BaseModel):
    """One cell (task x fraction x init x model) of summary.json: test metrics over its seeds' chosen trials,
    the chosen configurations, ``best_test`` (:class:`TrialTest`) and the labelled training data the cell's
    label fraction gives (patients, volumes)."""

    model_config = ConfigDict(extra="allow")

    task: str
    fraction: float
    init: str
    model: str
    dice_mean: float | None = None
    dice_std: float | None = None
    dice_seed_std: float | None = None
    dice_seeds: list[float] = []
    hd95_mean: float | None = None
    hd95_undefined: int = 0
    dice_lesion_mean: float | None = None
    healthy_predicted_empty: float | None = None
    n_test_healthy: int = 0
    n_test: int = 0
    n_seeds: int = 0
    best_config: ChosenTrial | None = None
    best_test: TrialTest | None = None
    seed_configs: list[ChosenTrial] = []
    trials: int = 0
    trials_failed: int = 0
    trials_stopped: int = 0
    errors: list[str] = []
    n_train_patients: int  # last, where the file has always had them
    n_train_volumes: int

    @property
    def spread(self) -> float | None:
        """The +- of the cell's Dice: the std of the per-seed means with several seeds, else across test volumes."""
        return self.dice_seed_std if self.dice_seed_std is not None else self.dice_std


class SweepSummary(BaseModel):
    """A sweep's summary.json (written by :func:`octssl.tune.sweep.run_sweep`; ``schema_version`` in the file)."""

    model_config = ConfigDict(extra="allow")

    schema_version: int = SCHEMA_VERSION
    name: str | None = None
    corpus: str | None = None
    corpus_version: dict[str, Any] | None = None
    tasks: list[str] = []
    fractions: list[float] = []
    inits: dict[str, str] = {}
    models: list[str] = []
    seeds: list[int] = []
    num_samples: int | None = None
    search: str | None = None
    trials: dict[str, int] = {}
    cells: list[SweepCell] = []
    sweep_dir: str | None = None
    bundles: dict[str, str] | None = None
    timings_s: dict[str, float] | None = None
    sampler: str | None = None  # the search's sampler (name and settings); last, where the file has it

    def test_metrics(self) -> dict[str, float]:
        """Each cell's test means and stds keyed ``test/<task>-<fraction>-<init>-<model>/<name>`` (what the
        sweep's tracked run records; a failed cell's missing values are left out)."""
        return {f"test/{c.task}-{c.fraction}-{c.init}-{c.model}/{name}": float(value) for c in self.cells
                for name, value in c.model_dump().items()
                if name.endswith(("_mean", "_std")) and isinstance(value, (int, float))}


def read_sweep_summary(text: str | bytes, source: str = "summary.json") -> SweepSummary:
    """summary.json's content as a :class:`SweepSummary` (files written before ``schema_version`` read too);
    ConfigError naming ``source`` (the file) when it is not one."""
    try:
        return SweepSummary.model_validate_json(text)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise ConfigError(f"{source}: not a sweep summary ({where + ': ' if where else ''}{first['msg']})") from None
