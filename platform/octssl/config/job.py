"""Typed job configurations (pydantic): YAML files plus dotted ``--set a.b=c`` overrides.

Unknown keys are rejected with the key named. Checks that need no cluster run here, at load time;
checks that need the corpus or the cluster run in :func:`octssl.train.launch.preflight` before any
worker starts.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from octssl.errors import ConfigError
from octssl.vocab import FAF, RECONSTRUCTION, SEGMENTATION, TARGETS, ObjectiveKind, Target

_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Section):
    """Where samples come from and how they are batched."""

    corpus: str | None = Field(None, description="corpus directory (manifest.parquet + volumes.zarr)")
    shards: str | None = Field(None, description="WebDataset shard directory (for source=stream)")
    source: Literal["zarr", "stream"] = "zarr"
    crop: tuple[PositiveInt, PositiveInt] = Field((32, 64), description="training crop (nB, W); depth is kept whole")
    batch_size: int = Field(2, ge=1, description="per worker")
    loader_workers: int = Field(0, ge=0)
    prefetch: int = Field(4, ge=0, le=64, description="source=stream: samples each loader worker reads ahead "
                          "(range requests in flight on an object store, fadvise hints on disk)")
    crops_per_volume: int = Field(4, ge=1, description="random crops per training volume per epoch")
    augment: bool = True
    val_volumes: int | None = Field(None, ge=1, description="cap on val volumes per evaluation")


class ModelConfig(_Section):
    """Which registry model, at what width."""

    name: str = "fpn"
    width: float = Field(1.0, gt=0)
    checkpointing: bool = False


class ObjectiveConfig(_Section):
    """Reconstruction (SSL) or segmentation, and its target."""

    kind: ObjectiveKind = RECONSTRUCTION
    target: Target = FAF
    label_fraction: float = Field(1.0, gt=0, le=1, description="share of labelled train patients")
    l1_weight: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _target_fits_kind(self) -> ObjectiveConfig:
        allowed = TARGETS[self.kind]
        if self.target not in allowed:
            raise ValueError(f"objective.target={self.target!r} does not fit kind={self.kind!r}: use {allowed}")
        return self


class OptimConfig(_Section):
    """Optimiser, LR schedule and gradient clipping."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")


class DeepSpeedSection(_Section):
    """ZeRO stage and precision policy."""

    zero_stage: int = Field(1, ge=0, le=3)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"


class RunSection(_Section):
    """Length, cadence of logs/evals/checkpoints, storage, init weights."""

    max_steps: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    log_every: int = Field(5, ge=1)
    eval_every: int = Field(50, ge=1)
    ckpt_every: int = Field(50, ge=1)
    keep_last: int = Field(2, ge=1, description="checkpoints kept for resume; the best weights are kept too")
    seed: int = 1234
    storage_path: str = "runs"
    name: str | None = None
    init: str = Field("scratch", description="'scratch' or a path to model.safetensors")
    init_scope: Literal["all", "encoder"] = "all"
    max_bad_steps: int = Field(5, ge=1, description="consecutive non-finite losses before the run stops")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str | None) -> str | None:
        if name is not None and not _RUN_NAME.fullmatch(name):
            raise ValueError(f"{name!r} must be one folder name inside storage_path: letters, digits, '.', '_' "
                             "and '-', starting with a letter or digit, at most 128 characters")
        return name

    @model_validator(mode="after")
    def _length_given(self) -> RunSection:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("run: give max_steps or epochs")
        return self

    def total_steps(self, steps_per_epoch: int) -> int:
        """``max_steps`` when given, else ``epochs`` epochs of ``steps_per_epoch``."""
        if self.max_steps is not None:
            return self.max_steps
        assert self.epochs is not None  # the validator above
        return self.epochs * steps_per_epoch


class ScalingSection(_Section):
    """Ray Train workers and their resources."""

    workers: int = Field(1, ge=1)
    gpus_per_worker: float = Field(0.0, ge=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(0, ge=-1, description="worker-group restarts; -1 = unlimited")


class TrackingSection(_Section):
    """MLflow experiment tracking (docs/monitoring.md); off unless a URI is set here or in MLFLOW_TRACKING_URI."""

    uri: str | None = Field(None, description="MLflow tracking server (default: $MLFLOW_TRACKING_URI; unset: off)")
    experiment: str | None = Field(None, description="MLflow experiment (default: octssl-<kind>)")


class JobConfig(_Section):
    """A pretraining or fine-tuning job: every section of the config."""

    kind: Literal["pretrain", "finetune"] = "pretrain"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    optim: OptimConfig = OptimConfig()
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    run: RunSection = RunSection(max_steps=100)
    scaling: ScalingSection = ScalingSection()
    tracking: TrackingSection = TrackingSection()

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
        if self.data.source == "zarr" and not self.data.corpus:
            raise ValueError("data.corpus is required for source=zarr")
        if self.data.source == "stream" and not self.data.shards:
            raise ValueError("data.shards is required for source=stream")
        if self.objective.kind == SEGMENTATION and self.data.source == "stream":
            raise ValueError("segmentation fine-tuning reads labelled subsets: use data.source=zarr")
        return self

    @property
    def run_dir(self) -> str:
        return f"{self.run.storage_path.rstrip('/')}/{self.run.name}"


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides; values are parsed as YAML (``0.1`` -> float, ``[1,2]`` -> list)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE in one word, e.g. --set optim.lr=0.05")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as err:
            problem = " ".join(str(getattr(err, "problem", None) or err).split())
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({problem})") from None
    return out


def known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key a config model accepts (sections and the keys inside them), for "did you mean"."""
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys.extend(known_keys(field.annotation, dotted + "."))
    return keys


def nearest_key(key: str, model: type[BaseModel]) -> str | None:
    """The accepted key closest in spelling to ``key`` (None when nothing is close)."""

    matches = difflib.get_close_matches(key, known_keys(model), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _describe(err: ValidationError, source: str, overrides: list[str] | None = None,
              model: type[BaseModel] | None = None) -> str:
    """One line naming where each problem came from: the ``--set`` that set the key, else ``source`` (the
    YAML file); an unknown key gets the nearest accepted one."""
    given = {item.split("=", 1)[0].strip(): item for item in overrides or [] if "=" in item}
    found: dict[str, list[str]] = {}
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            near = nearest_key(key, model) if model is not None else None
            text = f"unknown key '{key}'" + (f" (did you mean '{near}'?)" if near else "")
        else:
            text = f"{key}: {e['msg']}"
        setter = next((given[k] for k in given if key == k or key.startswith(k + ".")), None)
        found.setdefault(f"--set {setter}" if setter else source, []).append(text)
    return "; ".join(f"{where}: invalid config: " + "; ".join(texts) for where, texts in found.items())


def parse_config(raw: dict[str, Any], source: str = "<config>", overrides: list[str] | None = None) -> JobConfig:
    """Validate a config dict; ConfigError names every bad or unknown key and where it came from (the
    ``--set`` among ``overrides`` that set it, else ``source``)."""
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err, source, overrides, JobConfig)) from None


def read_yaml(path: str | Path | None, what: str = "config") -> tuple[dict[str, Any], str]:
    """A YAML file's top-level mapping and a name for messages ({} and "<defaults>" when path is None)."""
    if path is None:
        return {}, "<defaults>"
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return raw, str(path)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> JobConfig:
    """Load a YAML job config (or start from defaults when ``path`` is None) and apply overrides."""
    raw, source = read_yaml(path)
    return parse_config(apply_overrides(raw, overrides or []), source, overrides)


def dump_config(config: JobConfig) -> str:
    """The resolved config as YAML (what RUN_DIR/config.yaml holds)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
