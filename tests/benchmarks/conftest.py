"""Benchmarks are scripts in benchmarks/ (not a package): make them importable for their smoke tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
