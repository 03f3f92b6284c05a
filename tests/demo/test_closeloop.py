"""Closing the loop: a sweep's GA bundle predicts the test split, growth follows, report.md shows both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from octssl.apply.bundle import export_model
from octssl.cli import app
from octssl.demo.closeloop import close_loop
from octssl.errors import PredictError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_close_loop_on_a_sweep_directory(finetuned_run: Path, growth_corpus: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "report.md").write_text("# Label-efficiency sweep\n")
    with pytest.raises(PredictError, match="no GA bundle"):
        close_loop(sweep, growth_corpus, progress=False)
    export_model(finetuned_run, "ga", sweep / "bundles" / "ga")
    result = close_loop(sweep, growth_corpus, progress=False)
    assert result["volumes"] > 0 and result["with_labels"] == result["volumes"]
    rows = [line for line in (sweep / "predict" / "predictions.csv").read_text().splitlines()[1:]]
    assert len(rows) == result["volumes"]
    assert (sweep / "area_scatter.png").read_bytes().startswith(PNG_MAGIC)
    report = (sweep / "report.md").read_text()
    assert report.startswith("# Label-efficiency sweep") and "## From the GA bundle to GA growth" in report
    assert "![Predicted vs true GA area](area_scatter.png)" in report
    assert json.loads((sweep / "loop.json").read_text())["growth"]["eyes"] > 0


@pytest.mark.slow
def test_quick_demo_closes_the_loop(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--quick", "--no-close-loop"])
    assert result.exit_code == 0, result.output
    assert "loop" not in json.loads((out / "demo.json").read_text())["timings_s"]  # opting out skips the stage
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--quick"])
    assert result.exit_code == 0, result.output
    done = json.loads((out / "demo.json").read_text())
    assert "loop" in done["timings_s"] and (out / "corpus" / "ga_growth.csv").is_file()
    sweep = Path(done["paths"]["sweep"])
    assert "## From the GA bundle to GA growth" in (sweep / "report.md").read_text()
    assert (sweep / "bundles" / "ga" / "model.safetensors").is_file()
