"""bench_growth: the exponent fit, a small run end to end (every operation measured, the table's headline),
and the sweep's overhead with a trivial trainable (slow: it starts Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bench_growth
import table


def test_the_exponent_is_the_log_log_slope() -> None:
    assert bench_growth.exponent([10, 100, 1000], [1.0, 10.0, 100.0]) == pytest.approx(1.0)
    assert bench_growth.exponent([10, 100, 1000], [2.0, 2.0, 2.0]) == pytest.approx(0.0, abs=1e-9)
    assert bench_growth.exponent([10, 100], [5.0, 500.0]) == pytest.approx(2.0)
    assert bench_growth.exponent([10], [1.0]) is None


def test_a_small_run_measures_every_operation_and_makes_a_table_row(tmp_path: Path) -> None:
    out = tmp_path / "growth-test.json"
    assert bench_growth.main(["--only", "corpus,shards", "--sizes", "100,1000", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    ops = {r["operation"] for r in result["rows"]}
    assert ops == set(bench_growth.CORPUS_OPS) | set(bench_growth.SHARD_OPS)
    by = {(r["operation"], r["size"]): r for r in result["rows"]}
    for op in bench_growth.CORPUS_OPS:
        assert by[(op, 1000)]["status"] == "ok" and by[(op, 1000)]["seconds"] > 0, by[(op, 1000)]
    assert by[("zarr epoch plan 1024", 100)]["status"].startswith("skipped")  # fewer samples than ranks x batch
    # an append writes its own rows, not the 1000-row manifest again
    assert by[("append one batch", 1000)]["manifest_bytes_written_per_append"] < 20_000
    assert out.with_suffix(".png").is_file()
    name, headline = table._growth(result | {"_file": out.name})
    assert name == "growth: up to 1,000 volumes" and "open " in headline and "append " in headline


@pytest.mark.slow
def test_the_sweep_overhead_runs_octssls_search_and_scheduler() -> None:
    result = bench_growth.sweep_overhead(3)
    assert result["per_trial_s"] > 0 and result["seconds"] >= result["per_trial_s"]
