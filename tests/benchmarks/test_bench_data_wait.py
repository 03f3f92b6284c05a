"""bench_data's extension: the data-wait fraction of real (tiny) training runs fed by each source."""

from __future__ import annotations

import json

import bench_data


def test_tiny_run_measures_reading_and_training_data_wait(tmp_path) -> None:
    out = tmp_path / "data.json"
    bench_data.main(["--volumes", "6", "--grid", "12,64,64", "--workers", "0", "--repeats", "1", "--passes", "1",
                     "--batch", "2", "--train-steps", "4", "--train-width", "0.25", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {r["path"] for r in result["rows"]} >= {"raw memmap", "ZarrSource", "StreamSource"}
    training = result["training"]
    assert [(r["source"], r["loader_workers"]) for r in training] == [("zarr", 0), ("stream", 0)]
    for row in training:
        assert row["status"] == "ok", row
        assert 0 <= row["data_wait_fraction"] <= 1 and row["step_s"] > 0
        assert row["data_wait_s_per_step"] <= row["step_s"]
    assert result["env"]["torch"] and len(result["env"]["load_average_end"]) == 3
