"""TorchScript and ONNX exports of a model: self-describing files, free batch/nB/W axes, parity, refusals."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch

from octssl.apply.runtimes import (
    ONNX,
    PARITY,
    TORCH,
    TORCHSCRIPT,
    check_parity,
    example_input,
    export_metadata,
    read_export_metadata,
    runtime_model,
    write_exports,
)
from octssl.errors import ModelError
from octssl.models.registry import build_model

GRID = (16, 64, 64)
CONFIG = {"format": "octssl-bundle", "format_version": "1.2", "task": "ga", "threshold": 0.35,
          "input": {"grid": list(GRID), "multiple": 16, "normalisation": "z-score per B-scan"},
          "card": {"intended_use": "research"}}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("fpn", width=0.25).eval()


@pytest.fixture(scope="module")
def exported(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("exports")
    return folder, write_exports(model, GRID, 16, folder, export_metadata(CONFIG))


def test_exports_describe_themselves(exported: tuple[Path, dict]) -> None:
    folder, entries = exported
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model.torchscript.pt"]
    assert entries[ONNX]["opset"] == 17 and all(len(e["sha256"]) == 64 for e in entries.values())
    for name in ("model.onnx", "model.torchscript.pt"):
        described = read_export_metadata(folder / name)
        assert described["threshold"] == 0.35 and described["task"] == "ga"
        assert described["input"]["grid"] == list(GRID) and "z-scored" in described["input"]["tensor"]
        assert described["card"] == {"intended_use": "research"}
    # onnxruntime shows the description to whoever runs the file alone
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map["octssl"])["threshold"] == 0.35
    graph = onnx.load(str(folder / "model.onnx"))
    (inputs,) = graph.graph.input
    dims = [d.dim_param or d.dim_value for d in inputs.type.tensor_type.shape.dim]
    assert dims == ["batch", 1, "nB", GRID[1], "W"]  # depth fixed, the rest free


@pytest.mark.parametrize("shape", [(1, 1, 16, 64, 64), (3, 1, 32, 64, 48)])
def test_three_runtimes_agree(model: torch.nn.Module, exported: tuple[Path, dict], shape: tuple[int, ...]) -> None:
    folder, entries = exported
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    probabilities = {}
    for kind in (TORCH, TORCHSCRIPT, ONNX):
        runner = runtime_model(kind, folder, entries, model, "bundle")
        with torch.no_grad():
            probabilities[kind] = torch.sigmoid(runner(x))
    assert probabilities[TORCH].shape == (shape[0], 1, shape[2], shape[4])
    for kind in (TORCHSCRIPT, ONNX):
        assert float((probabilities[kind] - probabilities[TORCH]).abs().max()) <= PARITY


def test_refusals(model: torch.nn.Module, exported: tuple[Path, dict], tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> None:
    folder, entries = exported
    with pytest.raises(ModelError, match="choose one of torch, torchscript, onnx"):
        runtime_model("tensorrt", folder, entries, model, "bundle")
    with pytest.raises(ModelError, match="bundle: the bundle has no onnx export"):
        runtime_model(ONNX, folder, {TORCHSCRIPT: entries[TORCHSCRIPT]}, model, "bundle")
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    with open(copy / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelError, match="model.onnx is not the file the config was written for"):
        runtime_model(ONNX, copy, entries, model, "bundle")
    (copy / "model.torchscript.pt").unlink()
    with pytest.raises(ModelError, match="model.torchscript.pt is missing"):
        runtime_model(TORCHSCRIPT, copy, entries, model, "bundle")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the extra were not installed
    with pytest.raises(ModelError, match=r"needs onnxruntime, which is not installed: pip install 'octssl\[interop\]'"):
        runtime_model(ONNX, folder, entries, model, "bundle")


def test_exports_of_another_model_fail_the_parity_check(exported: tuple[Path, dict]) -> None:
    folder, _ = exported
    other = build_model("fpn", width=0.25).eval()
    with pytest.raises(ModelError, match="differs from the model by"):
        check_parity(other, folder, GRID, 16)


def test_example_input_is_on_the_multiple() -> None:
    assert example_input((13, 40, 70), 16).shape == (1, 1, 16, 40, 80)
    assert json.dumps(export_metadata(CONFIG))  # plain JSON
