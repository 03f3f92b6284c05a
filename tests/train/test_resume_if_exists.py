"""`octssl pretrain CONFIG --resume-if-exists` starts a run that is not there and continues one that is (what a
retried job wants; slow: two Ray start-ups)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import JOBS


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_resume_if_exists_starts_then_continues(train_corpus: Path, tmp_path: Path) -> None:
    storage = tmp_path / "runs"
    args = [
        sys.executable, "-m", "octssl", "pretrain", str(JOBS / "pretrain.yaml"), "--resume-if-exists",
        "--set", f"data.corpus={train_corpus}", "--set", f"run.storage_path={storage}", "--set", "run.name=again",
        "--set", "data.crop=[16, 64]", "--set", "data.batch_size=2", "--set", "model.width=0.25",
        "--set", "run.ckpt_every=2", "--set", "run.log_every=1", "--set", "run.eval_every=100",
        "--set", "scaling.workers=1",
    ]
    first = subprocess.run([*args, "--set", "run.max_steps=2"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    second = subprocess.run([*args, "--set", "run.max_steps=4"], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (storage / "again" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # continued from step 2, nothing trained twice
