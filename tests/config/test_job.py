"""Job configs: YAML + overrides, unknown keys named, impossible settings refused at load time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from octssl.config.job import apply_overrides, load_config
from octssl.errors import ConfigError
from octssl.models.precision import cpu_has_native_bf16, resolve_precision
from octssl.train.engine import deepspeed_config, lr_factor

JOBS = Path(__file__).resolve().parents[2] / "jobs"


@pytest.mark.parametrize("name", ["pretrain.yaml", "finetune_ga.yaml", "finetune_rpd.yaml"])
def test_shipped_job_configs_load(name: str) -> None:
    config = load_config(JOBS / name)
    assert config.kind in ("pretrain", "finetune")
    assert config.run.max_steps or config.run.epochs


def test_overrides_parse_yaml_values() -> None:
    config = load_config(JOBS / "pretrain.yaml", ["optim.lr=0.5", "data.crop=[8, 32]", "model.checkpointing=true"])
    assert config.optim.lr == 0.5
    assert tuple(config.data.crop) == (8, 32)
    assert config.model.checkpointing is True


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'optim.learning_rate'"):
        load_config(JOBS / "pretrain.yaml", ["optim.learning_rate=0.1"])


def test_bad_values_are_explained() -> None:
    with pytest.raises(ConfigError, match="label_fraction"):
        load_config(JOBS / "finetune_ga.yaml", ["objective.label_fraction=1.5"])
    with pytest.raises(ConfigError, match="does not fit kind"):
        load_config(JOBS / "finetune_ga.yaml", ["objective.target=faf"])
    with pytest.raises(ConfigError, match="zero_stage"):
        load_config(JOBS / "pretrain.yaml", ["deepspeed.zero_stage=4"])


def test_missing_file_and_bad_override(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["optim.lr"])


def test_precision_policy_cpu_and_gpu() -> None:
    cpu = resolve_precision("auto", gpu=False)
    assert cpu.name == "fp32" and cpu.autocast_dtype is None and not cpu.channels_last
    gpu = resolve_precision("auto", gpu=True)
    assert gpu.name == "bf16" and gpu.channels_last
    with pytest.raises(ConfigError, match="needs a GPU"):
        resolve_precision("fp16", gpu=False)
    if cpu_has_native_bf16():
        assert resolve_precision("bf16", gpu=False).autocast_dtype == torch.bfloat16
    else:
        with pytest.raises(ConfigError, match="native bf16"):
            resolve_precision("bf16", gpu=False)
    ds = deepspeed_config(load_config(JOBS / "pretrain.yaml"), gpu)
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "bf16" not in ds  # DeepSpeed's own bf16 mode breaks BatchNorm running stats


def test_warmup_then_cosine() -> None:
    factors = [lr_factor(s, 100, 10, "cosine") for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert factors[-1] < 0.01
    assert lr_factor(50, 100, 0, "constant") == 1.0


def test_a_bad_set_is_named_with_the_nearest_key_not_the_yaml_file() -> None:
    """Issue 26.8: `--set optim.lrr=0.01` was blamed on the YAML file, with no nearest key."""
    path = Path(__file__).parents[2] / "jobs" / "pretrain.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(path, ["optim.lrr=0.01"])
    assert str(err.value).startswith("--set optim.lrr=0.01: ") and str(path) not in str(err.value)
    assert "did you mean 'optim.lr'?" in str(err.value)
    with pytest.raises(ConfigError, match=r"^--set run.max_steps=-3: invalid config: run.max_steps"):
        load_config(path, ["run.max_steps=-3"])


def test_set_without_equals_and_stray_words_get_one_clear_line(tmp_path: Path) -> None:
    """`--set run.max_steps 10` got click's "unexpected extra argument"; now it says how to write it."""
    from typer.testing import CliRunner

    from octssl.cli import app

    path = str(Path(__file__).parents[2] / "jobs" / "pretrain.yaml")
    result = CliRunner().invoke(app, ["pretrain", "-c", path, "--set", "run.max_steps", "10", "--dry-run"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "write --set run.max_steps=10" in text and "unexpected extra argument" not in text
    sweep = str(Path(path).with_name("sweep.yaml"))
    result = CliRunner().invoke(app, ["sweep", "-c", sweep, "stray", "--dry-run"])
    assert result.exit_code == 2 and "unexpected argument(s) 'stray'" in " ".join(result.output.split())
