"""`octssl plot RUN_DIR`: PNG curves from a run's metrics.jsonl and val.jsonl, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from octssl.cli import app


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "pretrain-x"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": s, "loss": 1 / s, "samples_per_s": 10.0 + s, "data_wait_s": 0.01, "step_s": 0.1, "lr": 1e-3,
         "total_steps": 20}) + "\n" for s in range(1, 21)))
    (run / "val.jsonl").write_text("".join(json.dumps({"step": s, "val_loss": 1 / s, "ssim": s / 20, "l1": 0.1})
                                           + "\n" for s in (10, 20)))
    return run


def test_plot_writes_curves(tmp_path: Path):
    run = _run_dir(tmp_path)
    result = CliRunner().invoke(app, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    names = {"loss.png", "validation.png", "throughput.png"}
    assert {Path(line).name for line in result.stdout.split()} == names
    for name in names:
        with Image.open(run / "plots" / name) as image:
            assert image.format == "PNG" and image.width > 300
            assert len(set(image.convert("L").getdata())) > 10  # something was drawn


def test_plot_of_a_directory_without_a_run_is_one_clear_line(tmp_path: Path):
    result = CliRunner().invoke(app, ["plot", str(tmp_path)])
    output = result.output.replace("\n", "")  # rich wraps long lines
    assert result.exit_code == 1 and "no metrics.jsonl" in output and "Traceback" not in output


def test_a_broken_record_names_file_and_line(tmp_path: Path):
    run = _run_dir(tmp_path)
    with (run / "metrics.jsonl").open("a") as f:
        f.write("{not json\n")
    result = CliRunner().invoke(app, ["plot", str(run)])
    assert result.exit_code == 1 and "metrics.jsonl:21: not JSON" in result.output.replace("\n", "")
