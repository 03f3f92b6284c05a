"""Fixtures for training tests: a small synthetic corpus and a job config factory."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from octssl.config.job import JobConfig, load_config

JOBS = Path(__file__).resolve().parents[2] / "jobs"
GRID = (16, 64, 64)  # the smallest grid the fpn accepts: nB % 4, W % 16, D / 16 >= 4


@pytest.fixture(scope="session")
def train_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from octssl.corpus.synth import synthesize

    path = tmp_path_factory.mktemp("train") / "corpus"
    synthesize(path, volumes=20, grid=GRID, seed=3, labelled=1.0)
    return path


@pytest.fixture
def job(train_corpus: Path, tmp_path: Path) -> Callable[..., JobConfig]:
    """``job("pretrain.yaml", "optim.lr=0.01", ...)``: a tiny, fast job on the session corpus."""

    def make(name: str = "pretrain.yaml", *overrides: str) -> JobConfig:
        base = [
            f"data.corpus={train_corpus}", f"run.storage_path={tmp_path / 'runs'}", "data.crop=[16, 64]",
            "data.batch_size=2", "data.crops_per_volume=2", "data.val_volumes=4", "model.width=0.25",
            "run.max_steps=6", "run.log_every=1", "run.eval_every=100", "run.ckpt_every=3", "scaling.workers=1",
            "optim.warmup_steps=0",
        ]
        return load_config(JOBS / name, [*base, *overrides])

    return make


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray per test module (starting Ray costs seconds)."""
    import ray

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Ray Train's controller collects reports every 2 s by default: a worker killed sooner after a
    # checkpoint loses it. Poll faster so that the kill test exercises resume, not restart-from-zero.
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
