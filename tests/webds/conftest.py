"""WebDataset fixtures: one read-only export of the tiny corpus, and private copies to damage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from octssl.webds.export import export_shards


@pytest.fixture(scope="module")
def shards(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only export of the tiny corpus, 5 samples per shard."""
    out = tmp_path_factory.mktemp("shards") / "all"
    export_shards(tiny_corpus, out, samples_per_shard=5, progress=False)
    return out


@pytest.fixture
def damaged(shards: Path, tmp_path: Path) -> Path:
    """A private copy of the export, free to damage."""
    return Path(shutil.copytree(shards, tmp_path / "copy"))
