"""Registry models: parameter counts from the paper, output shapes, and clear errors for sizes that cannot fit."""

from __future__ import annotations

import pytest
import torch

from octssl.errors import ModelError
from octssl.models import MODELS, build_model


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_registry_names() -> None:
    assert set(MODELS) == {"fpn", "resensnet", "lachinov", "ipn", "unet2d"}


@pytest.mark.parametrize(("name", "expected"), [("fpn", 4_369_553), ("resensnet", 4_718_737)])
def test_paper_parameter_counts(name: str, expected: int) -> None:
    assert trainable(build_model(name)) == expected


def test_lachinov_has_about_1_51m_used_parameters() -> None:
    # The paper: "about 1.51M used parameters" (docs/models.md); every parameter being used is checked by the gradient test.
    assert round(trainable(build_model("lachinov")) / 1e4) == 151


def test_width_and_out_channels_scale_the_model() -> None:
    full = trainable(build_model("fpn"))
    half = build_model("fpn", width=0.5, out_channels=3)
    # Conv weights scale with width^2: a half-width FPN has roughly a quarter of the parameters.
    assert 0.2 < trainable(half) / full < 0.3
    assert half.head.out_channels == 3


# Odd but valid sizes: nB a multiple of 4 but not of 16, D not a power of two, W a multiple of 16 only.
@pytest.mark.parametrize(("name", "shape"), [
    ("fpn", (2, 1, 12, 80, 48)),
    ("resensnet", (2, 1, 4, 128, 16)),
    ("lachinov", (2, 1, 5, 40, 24)),
    ("ipn", (2, 1, 3, 40, 20)),
    ("unet2d", (2, 1, 12, 7, 48)),
])
def test_output_shape_for_odd_valid_sizes(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(name, width=0.25, out_channels=2)
    with torch.no_grad():
        logits = model(torch.randn(shape))
    b, _, bscans, _, ascans = shape
    assert logits.shape == (b, 2, bscans, ascans)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(("name", "shape", "message"), [
    ("fpn", (1, 1, 32, 128, 250), "W=250 must be a multiple of 16 for fpn"),
    ("fpn", (1, 1, 30, 128, 256), "nB=30 must be a multiple of 4 for fpn"),
    ("fpn", (1, 1, 32, 48, 256), "D=48 must be >= 64 for fpn"),
    ("resensnet", (1, 1, 32, 80, 256), "D=80 must be 128 for resensnet"),
    ("lachinov", (1, 1, 32, 128, 20), "W=20 must be a multiple of 8 for lachinov"),
    ("lachinov", (1, 1, 32, 4, 64), "D=4 must be >= 8 for lachinov"),
    ("ipn", (1, 1, 32, 16, 64), "D=16 must be >= 32 for ipn"),
    ("unet2d", (1, 1, 6, 128, 64), "nB=6 must be a multiple of 4 for unet2d"),
    ("fpn", (1, 2, 32, 128, 256), "C=2 must equal in_channels=1"),
    ("fpn", (1, 32, 128, 256), "must be 5-D"),
])
def test_invalid_sizes_raise_clear_errors(name: str, shape: tuple[int, ...], message: str) -> None:
    model = build_model(name, width=0.25)
    with pytest.raises(ModelError, match=message):
        model.check_input_shape(shape)
    with pytest.raises(ModelError, match=message):
        model(torch.zeros(shape))


def test_every_problem_is_named_at_once() -> None:
    with pytest.raises(ModelError) as err:
        build_model("fpn", width=0.25).check_input_shape((1, 1, 30, 48, 250))
    assert all(axis in str(err.value) for axis in ("W=250", "nB=30", "D=48"))


@pytest.mark.parametrize("options", [{"width": 0}, {"out_channels": 0}, {"in_channels": -1}])
def test_invalid_options_raise(options: dict) -> None:
    with pytest.raises(ModelError):
        build_model("fpn", **options)


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(ModelError, match="unknown model 'fpn3d'.*fpn, resensnet"):
        build_model("fpn3d")


@pytest.mark.parametrize("name", ["fpn", "lachinov", "ipn"])
def test_channels_last_3d_input_gives_the_same_logits(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, width=0.25).eval()
    volume = torch.randn(2, 1, 4, 64, 32)
    with torch.no_grad():
        plain = model(volume)
        channels_last = model(volume.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(channels_last, plain, rtol=1e-4, atol=1e-5)
    assert all(p.is_contiguous() for p in model.parameters())
