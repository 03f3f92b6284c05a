"""Weight transfer: save and load model weights as safetensors (never pickle), whole network or encoder only.

A weights file holds the model's state dict (parameters and BatchNorm running statistics) and string
metadata: `octssl.model` (registry name), `octssl.options` (JSON of build_model options) and every key of
the caller's metadata, JSON-encoded. `model_from_weights(path)` rebuilds the model from that metadata.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from octssl.errors import ModelError
from octssl.storage.location import Location, local_copy

MODEL_KEY = "octssl.model"
OPTIONS_KEY = "octssl.options"
SCOPES = ("all", "encoder")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DeepSpeed and torch.compile wrappers


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> Path | Location:
    """Write `model`'s state dict to `path` (safetensors; a file or an s3:// URL) with the model name,
    options and `metadata`."""
    where = Location.parse(path)
    if where.remote:
        with tempfile.TemporaryDirectory(prefix="octssl-put-") as folder:
            where.upload(Path(str(save_weights(model, Path(folder) / where.name, metadata))))
        return where
    path = where.local
    model = _unwrap(model)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    header = {key: json.dumps(value, default=str) for key, value in (metadata or {}).items()}
    if hasattr(model, "name") and hasattr(model, "options"):
        header[MODEL_KEY] = str(model.name)
        header[OPTIONS_KEY] = json.dumps(model.options)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    tmp.replace(path)
    return path


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and raw string metadata of a safetensors file (or s3:// object); ModelError naming the
    path if unreadable."""
    where = Location.parse(path)
    if not where.is_file():
        raise ModelError(f"{where}: weights file not found")
    try:
        with local_copy(where) as local, safe_open(str(local), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelError(f"{path}: not a readable safetensors weights file ({err})") from err
    return tensors, metadata


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata stored with the weights, JSON-decoded (model name as a plain string)."""
    _, raw = read_weights(path)
    decoded: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            decoded[key] = value if key == MODEL_KEY else json.loads(value)
        except json.JSONDecodeError:
            decoded[key] = value
    return decoded


def load_weights(model: nn.Module, path: str | Path, scope: str = "all") -> list[str]:
    """Copy weights from `path` into `model`; returns the keys loaded.

    scope="all": every key of the model must be in the file with the same shape, and the file may hold
    no other keys. scope="encoder": only the model's encoder keys (`model.encoder_prefixes`) are loaded
    and must all be present; other keys in the file are ignored. Any mismatch raises one ModelError
    listing every missing, unexpected and mis-shaped key.
    """
    if scope not in SCOPES:
        raise ModelError(f"load_weights scope={scope!r} must be one of {', '.join(SCOPES)}")
    model = _unwrap(model)
    tensors, _ = read_weights(path)
    tensors = _strip_wrappers(tensors)
    own = model.state_dict()
    if scope == "encoder":
        prefixes = tuple(getattr(model, "encoder_prefixes", ()))
        if not prefixes:
            raise ModelError(f"{type(model).__name__} declares no encoder_prefixes; load {path} with scope='all'")
        own = {k: v for k, v in own.items() if k.startswith(prefixes)}
        tensors = {k: v for k, v in tensors.items() if k.startswith(prefixes)}
    problems = [f"missing in file: {k}" for k in own if k not in tensors]
    problems += [f"unexpected in file: {k}" for k in tensors if k not in own]
    problems += [f"shape of {k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in own.items() if k in tensors and tensors[k].shape != v.shape]
    if problems:
        raise ModelError(f"{path}: weights do not fit {getattr(model, 'name', type(model).__name__)} "
                         f"(scope={scope}), {len(problems)} problems: " + "; ".join(problems))
    broken = [k for k in own if tensors[k].is_floating_point() and not bool(torch.isfinite(tensors[k]).all())]
    if broken:
        raise ModelError(f"{path}: weights hold NaN or inf in {len(broken)} tensors ({', '.join(broken[:5])}"
                         f"{', ...' if len(broken) > 5 else ''}); a diverged run's weights cannot be an init")
    with torch.no_grad():
        for key, value in own.items():
            value.copy_(tensors[key].to(dtype=value.dtype))
    return list(own)


def model_from_weights(path: str | Path, **overrides: Any) -> nn.Module:
    """Rebuild the registry model stored in `path` (name and options from its metadata) with its weights.

    `overrides` replace stored options (e.g. checkpointing=True); changing shapes makes loading fail.
    """
    from octssl.models.registry import build_model

    metadata = read_metadata(path)
    if MODEL_KEY not in metadata or not isinstance(metadata.get(OPTIONS_KEY), dict):
        raise ModelError(f"{path}: no {MODEL_KEY}/{OPTIONS_KEY} metadata; build the model and use load_weights")
    model = build_model(metadata[MODEL_KEY], **{**metadata[OPTIONS_KEY], **overrides})
    load_weights(model, path, scope="all")
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DeepSpeed (`.module`) or torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _strip_wrappers(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in WRAPPER_PREFIXES:
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors
