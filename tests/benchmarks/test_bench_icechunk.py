"""bench_icechunk --quick: every engine/storage row is measured, with positive rates and ratios to octssl local."""

from __future__ import annotations

import json

import pytest

import bench_icechunk
import table
from octssl.dev.s3local import weed_binary


def test_quick_run_measures_octssl_and_icechunk_rows(tmp_path) -> None:
    missing = bench_icechunk.icechunk_missing()
    if missing:
        pytest.skip(missing)
    s3 = weed_binary() is not None
    out = tmp_path / "icechunk.json"
    bench_icechunk.main(["--quick", "--out", str(out)] + ([] if s3 else ["--no-s3"]))
    result = json.loads(out.read_text())
    rows = {(r["engine"], r["storage"], r["layout"].split(" ")[0]): r for r in result["rows"]}
    wanted = {("octssl", "local", "sharded"), ("zarr", "local", "the"), ("icechunk", "local", "sharded"),
              ("icechunk", "local", "one"), ("icechunk direct", "local", "the")}
    if s3:
        wanted |= {("octssl", "s3", "sharded,"), ("icechunk", "s3", "sharded"), ("icechunk", "s3", "one"),
                   ("icechunk direct", "s3", "the")}
    assert set(rows) == wanted
    for key, row in rows.items():
        assert row["read_MB_per_s"] > 0 and row["ratio_to_octssl_local"]["read"] > 0, key
        if key[0] != "zarr" and key[0] != "icechunk direct":
            assert row["append_s_per_volume"] > 0 and row["ratio_to_octssl_local"]["append"] > 0, key
    assert rows[("octssl", "local", "sharded")]["ratio_to_octssl_local"] == {"read": 1.0, "append": 1.0}
    icechunk_rows = [r for r in result["rows"] if r["engine"] == "icechunk"]
    assert all(len(r["snapshots"]) == r["commits"] == 2 for r in icechunk_rows)  # 8 volumes, 4 per commit
    assert result["icechunk_skipped"] is None and result["env"]["load_average_end"]
    name, headline = table._icechunk(result)
    assert name == "icechunk: 8 x 16x64x64, 4 per commit" and "direct chunk get x" in headline


def test_without_icechunk_only_octssl_rows_run_and_the_json_says_why(tmp_path, monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_icechunk(name, *args, **kwargs):  # as on a machine without the wheel
        if name == "icechunk":
            raise ImportError("No module named 'icechunk'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_icechunk)
    out = tmp_path / "icechunk.json"
    bench_icechunk.main(["--quick", "--no-s3", "--out", str(out)])
    result = json.loads(out.read_text())
    assert "icechunk is not installed" in result["icechunk_skipped"]
    assert {r["engine"] for r in result["rows"]} == {"octssl", "zarr"}
    assert table._icechunk(result)[1].endswith("icechunk rows skipped")
