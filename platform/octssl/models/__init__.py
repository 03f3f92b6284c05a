"""Models: the FPN and its baselines behind one registry."""

from octssl.models.registry import MODELS, build_model

__all__ = ["MODELS", "build_model"]
