"""Weight transfer through safetensors: round trip, encoder-only loading, mismatches listed, no unpickling."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from octssl.errors import ModelError
from octssl.models import build_model, load_weights, model_from_weights, save_weights
from octssl.models.transfer import read_metadata

VOLUME = (2, 1, 4, 64, 32)


def trained_fpn(**options: object) -> torch.nn.Module:
    """An FPN whose weights and BatchNorm statistics differ from a fresh build."""
    torch.manual_seed(3)
    model = build_model("fpn", width=0.25, **options)
    model(torch.randn(VOLUME)).square().mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * p.grad)
    return model


def test_round_trip_rebuilds_the_same_model(tmp_path: Path) -> None:
    model = trained_fpn(out_channels=2)
    path = save_weights(model, tmp_path / "fpn.safetensors", {"run": "pretrain-faf", "epoch": 3})
    meta = read_metadata(path)
    assert meta["run"] == "pretrain-faf" and meta["epoch"] == 3
    assert meta["octssl.model"] == "fpn" and meta["octssl.options"]["out_channels"] == 2

    rebuilt = model_from_weights(path)
    assert type(rebuilt) is type(model)
    for (key, a), b in zip(model.state_dict().items(), rebuilt.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    volume = torch.randn(VOLUME)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(volume), model.eval()(volume))


def test_encoder_scope_loads_only_the_encoder(tmp_path: Path) -> None:
    source = trained_fpn()
    path = save_weights(source, tmp_path / "pretrained.safetensors")
    target = build_model("fpn", width=0.25, out_channels=3)  # another head: whole-network loading must fail
    before = {k: v.clone() for k, v in target.state_dict().items()}

    with pytest.raises(ModelError) as err:
        load_weights(target, path, scope="all")
    assert "shape of head.weight" in str(err.value) and "shape of head.bias" in str(err.value)

    loaded = load_weights(target, path, scope="encoder")
    assert loaded and all(k.startswith("encoder.") for k in loaded)
    for key, value in target.state_dict().items():
        expected = source.state_dict()[key] if key.startswith("encoder.") else before[key]
        assert torch.equal(value, expected), key


def test_every_mismatch_is_listed(tmp_path: Path) -> None:
    path = save_weights(trained_fpn(), tmp_path / "fpn.safetensors")
    wider = build_model("fpn", width=0.5)
    ours, theirs = wider.state_dict(), build_model("fpn", width=0.25).state_dict()
    mismatched = [k for k in ours if ours[k].shape != theirs[k].shape]
    with pytest.raises(ModelError) as err:
        load_weights(wider, path)
    assert f"{len(mismatched)} problems" in str(err.value)
    assert all(f"shape of {k}:" in str(err.value) for k in mismatched)

    with pytest.raises(ModelError) as err:
        load_weights(build_model("lachinov", width=0.25), path)
    message = str(err.value)
    assert "missing in file: upsample.0.weight" in message and "unexpected in file: projections.0" in message


def test_wrapper_prefixes_are_stripped(tmp_path: Path) -> None:
    source = trained_fpn()
    wrapped = torch.nn.Module()
    wrapped.module = source  # the shape DDP and DeepSpeed engines have
    path = save_weights(wrapped, tmp_path / "wrapped.safetensors")
    target = build_model("fpn", width=0.25)
    load_weights(target, path)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values(), strict=True))


class _Trap:
    """Unpickling this writes a marker file: proof that a loader unpickled its input."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.marker, "unpickled"))


def test_pickles_are_refused_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "weights.pt"
    path.write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(ModelError, match="not a readable safetensors"):
        load_weights(build_model("fpn", width=0.25), path)
    with pytest.raises(ModelError):
        model_from_weights(path)
    assert not marker.exists()


def test_missing_file_and_bad_scope(tmp_path: Path) -> None:
    model = build_model("fpn", width=0.25)
    with pytest.raises(ModelError, match="not found"):
        load_weights(model, tmp_path / "absent.safetensors")
    with pytest.raises(ModelError, match="scope='decoder'"):
        load_weights(model, tmp_path / "absent.safetensors", scope="decoder")
