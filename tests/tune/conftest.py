"""Fixtures for sweep tests: a tiny labelled corpus, a pretrained-format weights file, a sweep config factory."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

GRID = (16, 64, 64)  # the smallest grid the fpn accepts


@pytest.fixture(scope="session")
def sweep_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from octssl.corpus.synth import synthesize

    path = tmp_path_factory.mktemp("sweep") / "corpus"
    synthesize(path, volumes=20, grid=GRID, seed=3, labelled=1.0)
    return path


@pytest.fixture(scope="session")
def ssl_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Weights in the format pretraining exports (an untrained fpn with a reconstruction model card)."""
    import torch

    from octssl.models import build_model
    from octssl.models.transfer import save_weights

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ssl") / "model.safetensors"
    card = {"objective": {"kind": "reconstruction", "target": "faf"}}
    return save_weights(build_model("fpn", width=0.25), path, {"card": card})


@pytest.fixture
def sweep_raw(sweep_corpus: Path, tmp_path: Path) -> Callable[..., dict[str, Any]]:
    """``sweep_raw(**changes)``: a tiny sweep config dict (2 CPUs, a few steps per trial)."""

    def make(**changes: Any) -> dict[str, Any]:
        raw: dict[str, Any] = {
            "kind": "sweep", "corpus": str(sweep_corpus), "storage_path": str(tmp_path / "sweeps"), "name": "s",
            "tasks": ["ga"], "fractions": [1.0], "inits": {"scratch": "scratch"}, "seeds": [0],
            "search": {"num_samples": 1, "steps": [6], "grace_steps": 3, "lr": [0.003, 0.01]},
            "job": {"data": {"crop": [16, 64], "batch_size": 2, "crops_per_volume": 2, "val_volumes": 4},
                    "model": {"width": 0.25}, "optim": {"name": "adamw", "warmup_steps": 0},
                    "deepspeed": {"zero_stage": 0}, "run": {"eval_every": 3, "log_every": 1}},
            "figure_volumes": 2,
        }
        raw.update(changes)
        return raw

    return make


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray per test module (starting Ray costs seconds)."""
    import ray

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
