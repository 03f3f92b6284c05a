"""The command line as a user meets it: workflow order, --version, flags, one-line errors, summaries."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from octssl.cli import WORKFLOW, app
from octssl.demo.run import pretrain_line


def _octssl(*args: str) -> subprocess.CompletedProcess:
    """The installed console script's entry point in a fresh interpreter (main() owns error handling)."""
    code = "import sys; from octssl.cli import main; sys.argv = ['octssl', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


def test_help_lists_commands_in_workflow_order() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    listed = [line.split()[0] for line in result.output.split("Commands:")[1].splitlines() if line.strip()]
    ranked = [name for name in WORKFLOW if name in listed]
    assert listed[: len(ranked)] == ranked
    assert listed.index("synth") < listed.index("export-shards") < listed.index("pretrain") < listed.index("sweep")


def test_version_and_flags_render_as_flags() -> None:
    from importlib.metadata import version

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"octssl {version('octssl')}"
    info_help = CliRunner().invoke(app, ["info", "--help"]).output
    assert "--json" in info_help and "<bool>" not in info_help


def test_filesystem_errors_are_one_line(tmp_path: Path, tiny_corpus: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    synth = _octssl("synth", str(a_file / "corpus"), "--volumes", "2")
    assert synth.returncode == 2 and "Traceback" not in synth.stderr
    assert f"{a_file / 'corpus'}" in synth.stderr and "Not a directory" in synth.stderr
    export = _octssl("export-shards", str(tiny_corpus), "--out", str(a_file))
    assert export.returncode == 2 and "Traceback" not in export.stderr and str(a_file) in export.stderr


def test_existing_export_names_the_cli_flag(tmp_path: Path, tiny_corpus: Path) -> None:
    out = tmp_path / "shards"
    assert CliRunner().invoke(app, ["export-shards", str(tiny_corpus), "--out", str(out)]).exit_code == 0
    again = CliRunner().invoke(app, ["export-shards", str(tiny_corpus), "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_demo_pretrain_line_without_validation() -> None:
    from octssl.train.summary import RunSummary

    assert pretrain_line(RunSummary(steps=0, best_metric_name="ssim"), Path("w.safetensors")) == "no validation score, weights w.safetensors"
    assert pretrain_line({"best_metric": 0.5}, Path("w")).startswith("val SSIM 0.500 (best)")
