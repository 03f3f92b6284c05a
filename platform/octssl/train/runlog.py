"""The files a rank writes into RUN_DIR while it trains: logs, sample audit, heartbeat.

``metrics.jsonl`` and ``val.jsonl`` (rank 0), ``samples/rank{r}.jsonl`` (which volumes each step saw) and
``workers/rank{r}.json`` (pid and step: what an operator, or a test, needs to find a rank's process).
After a resume, records past the checkpoint's step are dropped: the resumed run replays those steps.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class RunLog:
    def __init__(self, run_dir: Path, rank: int) -> None:
        self.rank = rank
        self.metrics = run_dir / "metrics.jsonl"
        self.val = run_dir / "val.jsonl"
        self.samples = run_dir / "samples" / f"rank{rank}.jsonl"
        self.heartbeat = run_dir / "workers" / f"rank{rank}.json"
        self.samples.parent.mkdir(parents=True, exist_ok=True)
        self.heartbeat.parent.mkdir(parents=True, exist_ok=True)

    def step(self, step: int, epoch: int, ids: list[str]) -> None:
        with self.samples.open("a") as f:
            f.write(json.dumps({"step": step, "epoch": epoch, "ids": ids}) + "\n")
        self.heartbeat.write_text(json.dumps({"pid": os.getpid(), "step": step, "time": time.time()}))

    def log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            _append(self.metrics, record)

    def validation(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            _append(self.val, record)

    def rewind(self, step: int) -> None:
        """Drop records past ``step`` (the checkpoint a resumed run starts from)."""
        paths = [self.samples, *([self.metrics, self.val] if self.rank == 0 else [])]
        for path in paths:
            if path.exists():
                keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
                path.write_text("".join(line + "\n" for line in keep))


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
