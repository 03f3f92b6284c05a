"""The one sample format: a plain dict that flows from corpus to model, and its checks.

A sample: ``id`` (str), ``oct`` (``(nB, D, W)`` uint8, or float32 after normalisation), optional en-face
arrays ``faf``, ``slo``, ``ga``, ``rpd`` of shape ``(nB, W)`` on the volume's grid (uint8; masks hold 0/1),
and ``meta`` (dict: patient, eye, visit, device, scan_pattern, spacing_mm, split, grid, ...).
Keys are absent when the modality is absent.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from octssl.errors import SampleError
from octssl.vocab import ARRAY_KEYS, ENFACE_IMAGES, ENFACE_KEYS, MASKS
from octssl.vocab import VOLUME as VOLUME_KEY

__all__ = ["ARRAY_KEYS", "ENFACE_IMAGES", "ENFACE_KEYS", "MASKS", "VOLUME_KEY", "validate_sample"]


def validate_sample(sample: dict[str, Any], where: str = "") -> None:
    """Raise SampleError naming ``where`` and the sample id if ``sample`` breaks the format."""
    sid = sample.get("id", "<no id>")
    at = f"{where}: sample {sid}" if where else f"sample {sid}"
    if not isinstance(sample.get("id"), str) or not sample["id"]:
        raise SampleError(f"{at}: 'id' must be a non-empty string")
    if VOLUME_KEY not in sample:
        raise SampleError(f"{at}: missing '{VOLUME_KEY}' volume")
    vol = np.asarray(sample[VOLUME_KEY])
    if vol.ndim != 3:
        raise SampleError(f"{at}: 'oct' must be (nB, D, W), got shape {vol.shape}")
    if vol.dtype not in (np.uint8, np.float32):
        raise SampleError(f"{at}: 'oct' must be uint8 or float32, got {vol.dtype}")
    if vol.dtype == np.float32 and not np.isfinite(vol).all():
        raise SampleError(f"{at}: 'oct' contains NaN or inf")
    nb, _, w = vol.shape
    for key in ENFACE_KEYS:
        if key not in sample:
            continue
        arr = np.asarray(sample[key])
        if arr.shape != (nb, w):
            raise SampleError(f"{at}: '{key}' must be (nB, W)=({nb}, {w}) like the volume, got {arr.shape}")
        if arr.dtype not in (np.uint8, np.float32):
            raise SampleError(f"{at}: '{key}' must be uint8 or float32, got {arr.dtype}")
        if arr.dtype == np.float32 and not np.isfinite(arr).all():
            raise SampleError(f"{at}: '{key}' contains NaN or inf")
        if key in MASKS and arr.dtype == np.uint8 and arr.max(initial=0) > 1:
            raise SampleError(f"{at}: mask '{key}' must hold 0/1, found {int(arr.max())}")
    unknown = set(sample) - {"id", "meta", *ARRAY_KEYS}
    if unknown:
        raise SampleError(f"{at}: unknown keys {sorted(unknown)}")
