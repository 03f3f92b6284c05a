"""`octssl demo --quick`: every stage runs (synth, shards, 2-worker pretraining, sweep, report)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from octssl.cli import app

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_quick_demo_runs_every_stage(tmp_path: Path) -> None:
    import ray

    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--quick"])
    assert result.exit_code == 0, result.output
    done = json.loads((out / "demo.json").read_text())
    assert done["status"] == "done" and done["quick"] is True
    assert set(done["timings_s"]) == {"synth", "shards", "pretrain", "sweep", "loop", "total"}  # the loop closes by default
    assert (out / "shards" / "index.json").is_file()
    pretrain = json.loads((out / "runs" / "pretrain-faf" / "summary.json").read_text())
    assert pretrain["world_size"] == 2 and pretrain["best_metric_name"] == "ssim"
    sweep = Path(done["paths"]["sweep"])
    summary = json.loads((sweep / "summary.json").read_text())
    assert {(c["task"], c["init"]) for c in summary["cells"]} == {("ga", "scratch"), ("ga", "ssl-faf")}
    assert all(c["dice_mean"] is not None for c in summary["cells"])
    for name in ("dice_vs_fraction.png", "reconstructions.png", "segmentations.png"):
        assert (sweep / name).read_bytes().startswith(PNG_MAGIC)
    flat = "".join(result.output.split())  # rich wraps lines at the test terminal's width
    assert "GAtestDice" in flat and "report.md" in flat
    assert not ray.is_initialized()  # the demo shuts down the Ray it started



def test_demo_replaces_only_its_own_directories(tmp_path: Path) -> None:
    from octssl.demo.run import MARKER, prepare_out

    previous = tmp_path / "previous"
    (previous / "corpus").mkdir(parents=True)
    (previous / MARKER).write_text("{}")
    prepare_out(previous)
    assert not (previous / "corpus").exists() and (previous / MARKER).is_file()

    stranger = tmp_path / "not-a-demo"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    refused = CliRunner().invoke(app, ["demo", "--out", str(stranger), "--quick"])
    assert refused.exit_code == 1 and "was not written by `octssl demo`" in " ".join(refused.output.split())
    assert (stranger / "notes.txt").read_text() == "keep me"
