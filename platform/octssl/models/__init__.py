"""Models: the FPN and its baselines behind one registry, safetensors weight transfer, and model bundles."""

from octssl.apply.bundle import Bundle, load_bundle
from octssl.models.registry import MODELS, build_model
from octssl.models.transfer import load_weights, model_from_weights, save_weights

__all__ = ["MODELS", "Bundle", "build_model", "load_bundle", "load_weights", "model_from_weights", "save_weights"]
