"""Hostile configs and CLI arguments: bad YAML in --set, non-finite numbers, run names that leave
storage_path, --out naming a file, NaN init weights. Each is a one-line error, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from octssl.cli import app
from octssl.config.job import load_config
from octssl.config.sweep import load_sweep_config
from octssl.errors import ConfigError, ModelError

JOBS = Path(__file__).resolve().parents[2] / "jobs"
BASE = ["data.corpus=/nonexistent", "run.max_steps=1"]


@pytest.mark.parametrize("override", [
    "optim.lr=[1", "optim.lr={a: ", "optim.lr=!!python/object/apply:os.system ['true']",
    "run.name=!!python/name:os.system", "optim.lr='unterminated",
])
def test_bad_yaml_in_set_is_a_config_error(override: str) -> None:
    with pytest.raises(ConfigError, match="--set"):
        load_config(None, [*BASE, override])


@pytest.mark.parametrize("override", [
    "optim.lr=.inf", "optim.lr=.nan", "optim.lr=-.inf", "optim.weight_decay=.inf", "model.width=.nan",
    "optim.grad_clip=.inf", "objective.l1_weight=.nan", "scaling.cpus_per_worker=.inf",
])
def test_non_finite_numbers_are_refused(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.split(".")[-1]):
        load_config(None, [*BASE, override])


@pytest.mark.parametrize("override", [
    "search.lr=[0.001, .inf]", "search.weight_decay=[0.00001, .inf]", "search.reduction_factor=.inf",
    "search.lr=[.nan, 0.01]", "resources.cpus_per_trial=.inf", "fractions=[.nan]",
    "search.points=[{lr: .inf, weight_decay: 0.0, steps: 100}]",
])
def test_sweep_configs_refuse_non_finite_numbers(override: str) -> None:
    key = override.split("=")[0].split(".")[-1]
    with pytest.raises(ConfigError, match=key):
        load_sweep_config(JOBS / "sweep.yaml", [override])


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".", "", "/abs", "x\\y", "-rf", "name with space",
                                  ".hidden", "a" * 200])
def test_run_name_must_be_one_safe_path_component(name: str) -> None:
    with pytest.raises(ConfigError, match="run.name"):
        load_config(None, [*BASE, f"run.name='{name}'"])


@pytest.mark.parametrize("name", ["pretrain-20240101-101010", "ga_0.1_seed3", "A1"])
def test_ordinary_run_names_pass(name: str) -> None:
    assert load_config(None, [*BASE, f"run.name={name}"]).run.name == name


def _one_line_error(result) -> str:
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "error:" in text
    return text


def test_cli_bad_set_is_one_line(tmp_path: Path) -> None:
    for override in ("optim.lr=[1", "optim.lr=!!python/object/apply:os.system ['true']", "optim.lr=.inf",
                     "run.name=../../escape"):
        result = CliRunner().invoke(app, ["pretrain", "--config", str(JOBS / "pretrain.yaml"), "--set", override])
        assert str(JOBS / "pretrain.yaml") in _one_line_error(result) or "--set" in result.output
    assert not (tmp_path.parent / "escape").exists()


def test_cli_out_naming_an_existing_file(tiny_corpus: Path, tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    runner = CliRunner()
    text = _one_line_error(runner.invoke(app, ["export-shards", str(tiny_corpus), "--out", str(file)]))
    assert str(file) in text and "is a file" in text
    text = _one_line_error(runner.invoke(app, ["synth", str(file), "--volumes", "2"]))
    assert str(file) in text and "is a file" in text
    assert file.read_text() == "x"


def test_nan_weights_are_refused_as_an_init(tmp_path: Path) -> None:
    from octssl.models import build_model
    from octssl.models.transfer import load_weights, save_weights

    model = build_model("fpn", width=0.25, out_channels=1)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    path = save_weights(model, tmp_path / "nan.safetensors")
    with pytest.raises(ModelError, match=f"{path}.*NaN or inf"):
        load_weights(build_model("fpn", width=0.25, out_channels=1), path)
