"""Sweep configuration: the YAML of `octssl sweep`, its cells, and the fine-tuning job of each trial.

A sweep is a grid of *cells* (task x label fraction x init x model). Each cell is searched once per
seed (a *group*: the cell's whole protocol, search included, repeated per seed), and each trial of a
group is one fine-tuning job built by :func:`trial_job` from the sweep's ``job`` sections plus the
cell and the sampled hyperparameters. Keys the sweep decides itself may not be set in ``job``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from octssl.config.job import JobConfig, TrackingSection, apply_overrides, parse_config, read_yaml
from octssl.errors import ConfigError
from octssl.vocab import GA, MASKS, RPD, SEGMENTATION, Task

SCRATCH = "scratch"
#: job keys a sweep sets per trial (section -> keys); setting them in ``job`` is refused with a hint.
OWNED = {
    "kind": None,
    "data": {"corpus": "corpus", "source": None, "shards": None},
    "model": {"name": "models"},
    "objective": {"kind": None, "target": "tasks", "label_fraction": "fractions"},
    "optim": {"lr": "search.lr", "weight_decay": "search.weight_decay"},
    "run": {"max_steps": "search.steps", "epochs": "search.steps", "seed": "seeds", "init": "inits",
            "name": None, "storage_path": "storage_path", "ckpt_every": "job.run.eval_every"},
    "scaling": {"workers": None, "cpus_per_worker": "resources.cpus_per_trial",
                "gpus_per_worker": "resources.gpus_per_trial"},
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class Point(_Section):
    lr: float = Field(..., gt=0)
    weight_decay: float = Field(..., ge=0)
    steps: int = Field(..., ge=1)


class SearchSection(_Section):
    num_samples: int = Field(2, ge=1, description="trials per cell and seed")
    algorithm: Literal["optuna", "random"] = Field("optuna", description="sampler inside each cell")
    lr: tuple[float, float] = Field((1e-3, 3e-2), description="log-uniform learning-rate range")
    weight_decay: tuple[float, float] = Field((1e-5, 1e-3), description="log-uniform weight-decay range")
    steps: list[int] = Field([100], min_length=1, description="training-step choices")
    grace_steps: int = Field(50, ge=1, description="ASHA: no trial is stopped before this step")
    reduction_factor: float = Field(2.0, gt=1)
    points: list[Point] = Field([], description="first trials of every group (lr, weight_decay, steps)")

    @field_validator("lr", "weight_decay")
    @classmethod
    def _range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high:
            raise ValueError(f"need 0 < low <= high, got [{low}, {high}]")
        return value

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: list[int]) -> list[int]:
        if min(value) < 1:
            raise ValueError(f"steps must be >= 1, got {value}")
        return sorted(set(value))

    @model_validator(mode="after")
    def _points_in_space(self) -> SearchSection:
        for point in self.points:
            if point.steps not in self.steps:
                raise ValueError(f"points: steps={point.steps} is not one of steps {self.steps}")
        return self


class ResourcesSection(_Section):
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0, description="fractions share a GPU between trials")
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: what the cluster fits")


class SweepConfig(_Section):
    kind: Literal["sweep"] = "sweep"
    corpus: str = Field(..., description="corpus directory with GA/RPD labels")
    storage_path: str = "runs"
    name: str | None = Field(None, description="sweep directory name (default sweep-<time>)")
    tasks: list[Task] = Field([GA, RPD], min_length=1)
    fractions: list[float] = Field([0.05, 0.1, 0.2, 1.0], min_length=1)
    task_fractions: dict[str, list[float]] = Field({}, description="task -> its own fractions (else fractions)")
    inits: dict[str, str] = Field({SCRATCH: SCRATCH}, min_length=1, description="name -> 'scratch' or weights")
    models: list[str] = Field(["fpn"], min_length=1)
    seeds: list[int] = Field([0], min_length=1)
    search: SearchSection = SearchSection()
    resources: ResourcesSection = ResourcesSection()
    job: dict[str, Any] = Field({}, description="JobConfig sections shared by every trial")
    task_overrides: dict[str, list[str]] = Field({}, description="task -> --set overrides for its trials")
    test_volumes: int | None = Field(None, ge=1, description="cap on test volumes per cell (default: all)")
    figure_volumes: int = Field(3, ge=1, description="volumes shown in reconstructions/segmentations.png")
    metrics_port: int | None = Field(None, description="serve octssl_sweep_trials on this port")
    tracking: TrackingSection = TrackingSection()

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        return _check_fractions(value)

    @field_validator("task_fractions")
    @classmethod
    def _task_fractions(cls, value: dict[str, list[float]]) -> dict[str, list[float]]:
        return {task: _check_fractions(fractions) for task, fractions in value.items()}

    @field_validator("models")
    @classmethod
    def _models(cls, value: list[str]) -> list[str]:
        from octssl.models.registry import MODELS

        unknown = [m for m in value if m not in MODELS]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
        return value

    @field_validator("inits")
    @classmethod
    def _inits(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not name or any(c in name for c in "/|\\ "):
                raise ValueError(f"init name {name!r} must be a plain word (it names runs and table rows)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SweepConfig:
        for key in ("task_overrides", "task_fractions"):
            unknown = sorted(set(getattr(self, key)) - set(MASKS))
            if unknown:
                raise ValueError(f"{key}: unknown task(s) {unknown}; tasks are {MASKS}")
        return self

    def fractions_of(self, task: str) -> list[float]:
        return self.task_fractions.get(task, self.fractions)

    @property
    def cells(self) -> list[Cell]:
        return [Cell(t, f, i, m) for t in self.tasks for f in self.fractions_of(t) for i in self.inits
                for m in self.models]

    @property
    def groups(self) -> list[Group]:
        """Every (cell, seed), cell-major: a cell's seeds run one after the other."""
        return [Group(cell, s) for cell in self.cells for s in self.seeds]


def _check_fractions(value: list[float]) -> list[float]:
    bad = [f for f in value if not 0 < f <= 1]
    if bad:
        raise ValueError(f"label fractions must lie in (0, 1]; got {bad}")
    if not value:
        raise ValueError("give at least one label fraction")
    return sorted(set(value))


@dataclass(frozen=True)
class Cell:
    task: str
    fraction: float
    init: str
    model: str

    @property
    def key(self) -> str:
        return f"{self.task}-f{self.fraction:g}-{self.init}-{self.model}"


@dataclass(frozen=True)
class Group:
    cell: Cell
    seed: int

    @property
    def key(self) -> str:
        return f"{self.cell.key}-s{self.seed}"


def _describe(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        message = e["msg"].removeprefix("Value error, ")
        parts.append(f"unknown key '{key}'" if e["type"] == "extra_forbidden" else f"{key}: {message}")
    return f"{source}: invalid sweep config: " + "; ".join(parts)


def _check_job_keys(job: dict[str, Any], source: str) -> None:
    for section, value in job.items():
        if section not in OWNED:
            continue  # unknown sections are reported by JobConfig validation
        owned = OWNED[section]
        keys = [None] if owned is None else [k for k in (value or {}) if k in owned]
        for key in keys:
            where = f"job.{section}" + (f".{key}" if key else "")
            hint = None if owned is None or key is None else owned[key]
            raise ConfigError(f"{source}: {where} is set by the sweep per trial"
                              + (f": use '{hint}' instead" if hint else ""))


def parse_sweep_config(raw: dict[str, Any], source: str = "<sweep>") -> SweepConfig:
    try:
        config = SweepConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None
    _check_job_keys(config.job, source)
    trial_job(config, config.groups[0], {"lr": 0.01, "weight_decay": 0.0, "steps": config.search.steps[0]},
              "check", source=source)  # the shared job sections are valid for a trial
    return config


def load_sweep_config(path: str | Path | None, overrides: list[str] | None = None) -> SweepConfig:
    """A sweep YAML (``kind: sweep``) plus dotted ``--set`` overrides, validated before anything runs."""
    raw, source = read_yaml(path, "sweep config")
    return parse_sweep_config(apply_overrides(raw, overrides or []), source)


def trial_job(config: SweepConfig, group: Group, params: dict[str, Any], name: str, *,
              storage_path: str | None = None, source: str = "<sweep>") -> JobConfig:
    """The fine-tuning JobConfig of one trial: shared ``job`` sections, task overrides, then the cell."""
    cell = group.cell
    raw = copy.deepcopy(config.job)
    raw = apply_overrides(raw, config.task_overrides.get(cell.task, []))
    eval_every = (raw.get("run") or {}).get("eval_every", 50)
    sets = {
        "kind": "finetune",
        "data": {"corpus": config.corpus, "source": "zarr"},
        "model": {"name": cell.model},
        "objective": {"kind": SEGMENTATION, "target": cell.task, "label_fraction": cell.fraction},
        "optim": {"lr": float(params["lr"]), "weight_decay": float(params["weight_decay"])},
        "run": {"max_steps": int(params["steps"]), "epochs": None, "seed": int(group.seed), "name": name,
                "init": config.inits[cell.init], "storage_path": storage_path or config.storage_path,
                "ckpt_every": eval_every},  # the trial reports to Tune at each checkpoint step
        "scaling": {"workers": 1, "cpus_per_worker": config.resources.cpus_per_trial,
                    "gpus_per_worker": config.resources.gpus_per_trial},
    }
    for section, values in sets.items():
        if isinstance(values, dict):
            raw.setdefault(section, {})
            raw[section].update(values)
        else:
            raw[section] = values
    try:
        return parse_config(raw, f"{source} (trial job of {group.key})")
    except ConfigError as err:
        raise ConfigError(str(err).replace("invalid config", "invalid job section")) from None
