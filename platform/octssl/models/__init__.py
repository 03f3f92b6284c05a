"""Models: the FPN and its baselines behind one registry, safetensors weight transfer, the precision policy.
(Model bundles, which wrap weights for prediction, are :mod:`octssl.apply.bundle`.)"""

from octssl.models.registry import MODELS, build_model
from octssl.models.transfer import load_weights, model_from_weights, save_weights

__all__ = ["MODELS", "build_model", "load_weights", "model_from_weights", "save_weights"]
