"""The one place a job config becomes its training components: the objective and the model.

TorchTitan's ``TrainSpec`` is the model: :func:`octssl.train.launch.preflight`, ``Trainer.setup`` and the
dry run (:mod:`octssl.train.dryrun`) all build through :func:`build_components`, so the model they check,
train and count is the same one (same registry name, width, output channels, checkpointing, init weights).
"""

from __future__ import annotations

from dataclasses import dataclass

from octssl.config.job import JobConfig
from octssl.errors import ConfigError
from octssl.models.registry import OctModel, build_model
from octssl.models.transfer import load_weights
from octssl.storage.location import Location
from octssl.train.objectives import Objective, build_objective


@dataclass(frozen=True)
class Components:
    """What a job trains: its objective (loss and metrics) and its model."""

    objective: Objective
    model: OctModel


def build_components(config: JobConfig, *, load_init: bool = True) -> Components:
    """The job's objective and model; with ``load_init`` the model starts from ``run.init`` (see
    :func:`load_init_weights`). Under ``torch.device("meta")`` nothing is allocated (the dry run's count)."""
    c = config
    objective = build_objective(c.objective.kind, target=c.objective.target, l1_weight=c.objective.l1_weight)
    model = build_model(c.model.name, width=c.model.width, checkpointing=c.model.checkpointing, out_channels=1)
    if load_init:
        load_init_weights(model, c)
    return Components(objective=objective, model=model)


def load_init_weights(model: OctModel, config: JobConfig) -> None:
    """Load ``run.init`` (all weights, or the encoder's with ``run.init_scope=encoder``) unless it is scratch."""
    init = config.run.init
    if init == "scratch":
        return
    if not Location.parse(init).is_file():
        raise ConfigError(f"run.init={init}: no such weights file")
    load_weights(model, init, scope=config.run.init_scope)
