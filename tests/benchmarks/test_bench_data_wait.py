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


def test_tiny_run_reads_and_trains_from_a_local_s3_server(tmp_path) -> None:
    """``--s3``: the same shards read back from SeaweedFS on loopback (ratio to the local rows) and a training
    run fed from s3:// shards with its data-wait fraction."""
    out = tmp_path / "data-s3.json"
    bench_data.main(["--volumes", "6", "--grid", "12,64,64", "--workers", "0", "--repeats", "1", "--passes", "1",
                     "--batch", "2", "--train-steps", "4", "--train-width", "0.25", "--s3", "--out", str(out)])
    result = json.loads(out.read_text())
    s3_rows = [r for r in result["rows"] if r["path"] == "StreamSource (S3)"]
    assert [r["workers"] for r in s3_rows] == [0]
    for row in s3_rows:
        assert row["MB_per_s"] > 0 and row["ratio_to_local"] > 0, row
    (s3_run,) = [r for r in result["training"] if r["source"] == "stream-s3"]
    assert s3_run["status"] == "ok", s3_run
    assert 0 <= s3_run["data_wait_fraction"] <= 1 and s3_run["step_s"] > 0
