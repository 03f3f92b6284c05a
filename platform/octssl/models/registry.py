"""The model registry: names -> builders, and build_model(name, **options)."""

from __future__ import annotations

from octssl.errors import ModelError
from octssl.models.blocks import Builder, OctModel


def _fpn(**options: object) -> OctModel:
    from octssl.models.fpn import FPN

    return FPN(**options)  # type: ignore[arg-type]


def _resensnet(**options: object) -> OctModel:
    from octssl.models.fpn import ReSensNet

    return ReSensNet(**options)  # type: ignore[arg-type]


def _lachinov(**options: object) -> OctModel:
    from octssl.models.baselines import Lachinov

    return Lachinov(**options)  # type: ignore[arg-type]


def _ipn(**options: object) -> OctModel:
    from octssl.models.baselines import IPN

    return IPN(**options)  # type: ignore[arg-type]


def _unet2d(**options: object) -> OctModel:
    from octssl.models.baselines import UNet2d

    return UNet2d(**options)  # type: ignore[arg-type]


MODELS: dict[str, Builder] = {
    "fpn": _fpn,
    "resensnet": _resensnet,
    "lachinov": _lachinov,
    "ipn": _ipn,
    "unet2d": _unet2d,
}

OPTIONS = ("in_channels", "out_channels", "width", "checkpointing")


def build_model(name: str, *, in_channels: int = 1, out_channels: int = 1, width: float = 1.0,
                checkpointing: bool = False) -> OctModel:
    """Build a registry model mapping (B, in_channels, nB, D, W) to logits (B, out_channels, nB, W)."""
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name](in_channels=in_channels, out_channels=out_channels, width=float(width),
                        checkpointing=bool(checkpointing))
