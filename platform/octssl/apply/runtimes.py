"""Portable runtimes of a bundle: its model exported to TorchScript and ONNX, and run back from those files.

A bundle's model is traced once (``torch.jit.trace``, fp32, CPU) on a volume of its training grid; the
trace is saved as TorchScript and converted to ONNX (torch's TorchScript-based exporter: the
``torch.export`` one specialises the model's input-shape checks to the example's nB and W). Both files
take the normalised batch ``(B, 1, nB, D, W)`` float32 (D fixed to the grid's depth; B, nB and W free,
nB and W multiples of 16) and return the model's logits ``(B, K, nB, W)``; the probability is the sigmoid
of channel 0. Each file carries its own description (:func:`export_metadata`: task, threshold, input
contract, card) - TorchScript as the extra file ``octssl.json``, ONNX as the metadata property ``octssl`` -
so either can travel alone. An export is checked against the eager model on a second input shape before it
is kept (max abs probability difference <= :data:`PARITY`).

:func:`runtime_model` gives the callable a :class:`~octssl.apply.predictor.Predictor` runs for each
runtime: the eager module (``torch``), the loaded TorchScript module (``torchscript``) or an onnxruntime
session on its CPU provider (``onnx``) behind the same ``(B, 1, nB, D, W) -> logits`` call.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from octssl.errors import ModelError
from octssl.storage.files import sha256_of as sha256

TORCH, TORCHSCRIPT, ONNX = "torch", "torchscript", "onnx"
RUNTIMES = (TORCH, TORCHSCRIPT, ONNX)
EXPORT_FILES = {TORCHSCRIPT: "model.torchscript.pt", ONNX: "model.onnx"}
METADATA_KEY = "octssl"  # TorchScript extra file octssl.json / ONNX metadata property
OPSET = 17
PARITY = 1e-4  # max abs probability difference an export may show against the eager model
INPUT_NAME, OUTPUT_NAME = "oct", "logits"
INSTALL_HINT = "pip install 'octssl[interop]'"


def _multiple_of(value: int, multiple: int) -> int:
    return max(multiple, -(-int(value) // multiple) * multiple)


def example_input(grid: tuple[int, int, int], multiple: int, batch: int = 1, grow: int = 0) -> torch.Tensor:
    """A normalised batch on ``grid`` (nB and W rounded up to ``multiple``, plus ``grow`` multiples)."""
    nb, depth, width = grid
    shape = (batch, 1, _multiple_of(nb, multiple) + grow * multiple, depth, _multiple_of(width, multiple) + grow * multiple)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def export_metadata(config: dict[str, Any]) -> dict[str, Any]:
    """What an exported file says about itself: the model, task, threshold, input contract, the model card,
    the weights' card and origin."""
    return {
        "format": config.get("format"), "format_version": config.get("format_version"),
        "octssl_version": config.get("octssl_version"), "task": config.get("task"), "model": config.get("model"),
        "threshold": config.get("threshold"), "threshold_source": config.get("threshold_source"),
        "input": {**(config.get("input") or {}), "tensor": "(B, 1, nB, D, W) float32, D = grid depth, nB and W "
                  "multiples of `multiple`, each B-scan z-scored over its (D, W) plane"},
        "output": "logits (B, K, nB, W) float32; probability = sigmoid(channel 0); lesion where probability >= "
                  "threshold",
        "card": config.get("card"), "weights_card": config.get("weights_card"), "metrics": config.get("metrics"),
        "weights_sha256": (config.get("provenance") or {}).get("weights_sha256"),
    }



def write_exports(model: torch.nn.Module, grid: tuple[int, int, int], multiple: int, folder: Path,
                  metadata: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Write ``model.torchscript.pt`` and ``model.onnx`` into ``folder``; returns what a bundle config records
    of each (file, sha256, and the ONNX opset). ModelError when an export does not match the model."""
    import onnx

    model = model.to("cpu").eval()
    example = example_input(grid, multiple)
    text = json.dumps(metadata, default=str)
    with torch.no_grad(), warnings.catch_warnings():
        # The model's shape check turns sizes into ints (a TracerWarning); nothing downstream of it depends on
        # them, which the parity check below confirms on another shape. The TorchScript-based ONNX exporter
        # is deprecated in favour of torch.export, which cannot keep nB and W free here (module docstring).
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(folder / EXPORT_FILES[TORCHSCRIPT]), _extra_files={f"{METADATA_KEY}.json": text})
        onnx_path = folder / EXPORT_FILES[ONNX]
        torch.onnx.export(traced, (example,), str(onnx_path), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch", 2: "nB", 4: "W"}, OUTPUT_NAME: {0: "batch", 2: "nB", 3: "W"}})
    graph = onnx.load(str(onnx_path))
    onnx.helper.set_model_props(graph, {METADATA_KEY: text})
    onnx.checker.check_model(graph)
    onnx.save(graph, str(onnx_path))
    check_parity(model, folder, grid, multiple)
    return {TORCHSCRIPT: {"file": EXPORT_FILES[TORCHSCRIPT], "sha256": sha256(folder / EXPORT_FILES[TORCHSCRIPT])},
            ONNX: {"file": EXPORT_FILES[ONNX], "sha256": sha256(onnx_path), "opset": OPSET}}


def check_parity(model: torch.nn.Module, folder: Path, grid: tuple[int, int, int], multiple: int) -> None:
    """Refuse exports in ``folder`` whose probabilities differ from ``model``'s by more than :data:`PARITY` on a
    batch of two volumes one multiple larger than the traced example (so free axes are really free)."""
    x = example_input(grid, multiple, batch=2, grow=1)
    with torch.no_grad():
        reference = torch.sigmoid(model(x).float())
    for kind in (TORCHSCRIPT, ONNX):
        runner = load_export(kind, folder / EXPORT_FILES[kind])
        with torch.no_grad():
            difference = float((torch.sigmoid(runner(x)) - reference).abs().max())
        if not difference <= PARITY:
            raise ModelError(f"{folder / EXPORT_FILES[kind]}: the {kind} export differs from the model by {difference:.2e} "
                             f"in probability on input {tuple(x.shape)} (allowed {PARITY:g})")


class OnnxModel:
    """An ONNX export behind the torch model's call: ``(B, 1, nB, D, W)`` tensor in, logits tensor out (CPU)."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        ort = _onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default (one per core)
        options.log_severity_level = 3  # errors only: its graph-optimiser notes are not the user's business
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: array})[0])


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ModelError(f"--runtime onnx needs onnxruntime, which is not installed: {INSTALL_HINT}") from None
    return onnxruntime


def load_export(kind: str, path: Path) -> Any:
    """The runnable model of one export file (ModelError naming the file when it cannot be loaded)."""
    if kind == ONNX:
        _onnxruntime()
    try:
        if kind == TORCHSCRIPT:
            with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.x; this runtime exists to load it
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(str(path), map_location="cpu").eval()
        if kind == ONNX:
            return OnnxModel(path)
    except Exception as err:  # noqa: BLE001 - any loader failure is the same user-facing problem
        raise ModelError(f"{path}: cannot load the {kind} export ({type(err).__name__}: {err})") from None
    raise ModelError(f"runtime {kind!r} is not one of {RUNTIMES}")


def read_export_metadata(path: Path) -> dict[str, Any]:
    """The description an export carries (:func:`export_metadata`), read with the export's own library."""
    if path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return json.loads(props[METADATA_KEY])
    extra = {f"{METADATA_KEY}.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[f"{METADATA_KEY}.json"])


def runtime_model(kind: str, folder: Path, exports: dict[str, Any] | None, eager: torch.nn.Module,
                  shown: str) -> Any:
    """The model a Predictor runs for runtime ``kind`` of the bundle in ``folder`` (called ``shown``):
    ``eager`` itself for torch; the export file for the others, after checking it is the one the config
    names (sha256). ModelError when the bundle has no such export or the file differs."""
    if kind not in RUNTIMES:
        raise ModelError(f"--runtime {kind!r}: choose one of {', '.join(RUNTIMES)}")
    if kind == TORCH:
        return eager
    entry = (exports or {}).get(kind)
    if not entry:
        raise ModelError(f"{shown}: the bundle has no {kind} export (made before bundles carried exports): export it "
                         "again with `octssl export-model`")
    path = folder / entry["file"]
    if not path.is_file():
        raise ModelError(f"{shown}: {entry['file']} is missing (the config lists a {kind} export)")
    if sha256(path) != entry.get("sha256"):
        raise ModelError(f"{shown}: {entry['file']} is not the file the config was written for (sha256 differs)")
    return load_export(kind, path)
