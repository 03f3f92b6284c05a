"""Ingest fixtures: the real Heidelberg files from ../shared, broken copies of them, a pseudonym key."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

LINE_FILE = "Willis_B_716_0.vol"
CIRCLE_FILE = "Willis_B_716_2.vol"


@pytest.fixture
def vol_dir(shared_dir: Path) -> Path:
    """../shared/data/heidelberg-vol (read-only): a line scan, a circle scan and an empty invalid.vol."""
    path = shared_dir / "data" / "heidelberg-vol"
    if not (path / LINE_FILE).is_file():
        pytest.skip(f"{path / LINE_FILE} is absent; the real-device tests need it")
    return path


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    """A pseudonym key in OCTSSL_PSEUDONYM_KEY for the test's duration."""
    monkeypatch.setenv("OCTSSL_PSEUDONYM_KEY", "test-key-not-secret")
    return "test-key-not-secret"


@pytest.fixture
def mixed_sources(tmp_path: Path, vol_dir: Path) -> Path:
    """A folder with both real files, the empty invalid.vol, a truncated copy and random bytes named .vol."""
    src = tmp_path / "src"
    src.mkdir()
    for name in (LINE_FILE, CIRCLE_FILE, "invalid.vol"):
        shutil.copyfile(vol_dir / name, src / name)
    whole = (vol_dir / LINE_FILE).read_bytes()
    (src / "truncated.vol").write_bytes(whole[: len(whole) * 2 // 3])
    (src / "random.vol").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (src / "notes.txt").write_text("not a device file; walking the folder must ignore it")
    return src
