"""Segmentation inference on whole volumes: a model's en-face probability maps, and what is measured on them.

Volumes go through the evaluation path of training (z-score per B-scan, nB and W resized to multiples of
16 by ``EvalTransform``), in batches of volumes of one shape, with the training precision policy (bf16
autocast on GPU, fp32 on CPU); probabilities come back on each volume's own ``(nB, W)`` grid (bilinear).
A volume whose depth differs from the model's training depth is fitted first: non-raster scans keep the
device's full depth, so their retina is cropped to the ingest depth window before the depth is resized.

Measures: lesion area in mm^2 from the en-face pixel size (raster volumes only; B-scans of line, circle
and radial scans are not an en-face raster, so their pixels have no area), lesion count (8-connected
components), Dice and HD95 (mm) against a mask, and the threshold that maximises mean Dice on a set.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from octssl.ingest.grid import DEPTH_WINDOW_MM, resize, retina_window


def fit_depth(volume: np.ndarray, depth: int, depth_spacing_mm: float, raster: bool) -> np.ndarray:
    """``volume`` with ``depth`` rows: non-raster scans cropped to the retina window first, then resized."""
    if volume.shape[1] == depth:
        return volume
    if not raster:
        volume = volume[:, retina_window(volume, depth_spacing_mm, DEPTH_WINDOW_MM), :]
    return resize(volume, (volume.shape[0], depth, volume.shape[2]))


class Segmenter:
    """A segmentation model ready for whole volumes (eval mode, on its device, precision policy applied)."""

    def __init__(self, model: torch.nn.Module, *, depth: int | None = None, multiple: int = 16,
                 gpu: bool | None = None, batch_size: int = 4) -> None:
        from octssl.train.engine import on_gpu, resolve_precision

        use_gpu = on_gpu() if gpu is None else (gpu and torch.cuda.is_available())
        self.device = torch.device("cuda") if use_gpu else torch.device("cpu")
        self.precision = resolve_precision("auto", gpu=use_gpu)
        self.model = model.to(self.device).eval()
        self.depth, self.multiple, self.batch_size = depth, multiple, max(1, batch_size)

    @torch.no_grad()
    def probabilities(self, volumes: Sequence[np.ndarray], spacings: Sequence[Sequence[float]] | None = None,
                      rasters: Sequence[bool] | None = None) -> list[np.ndarray]:
        """Sigmoid probabilities ``(nB, W)`` float32 per uint8 volume ``(nB, D, W)``, batched by shape."""
        from octssl.data.transforms import EvalTransform, collate

        transform = EvalTransform(multiple=self.multiple, targets=())
        fitted = []
        for i, volume in enumerate(volumes):
            if self.depth is not None:
                spacing_d = float(spacings[i][1]) if spacings is not None else 0.0
                volume = fit_depth(np.asarray(volume), self.depth, spacing_d, True if rasters is None else rasters[i])
            fitted.append(volume)
        out: list[np.ndarray | None] = [None] * len(fitted)
        for indices in _batches(fitted, self.batch_size):
            batch = collate([transform({"id": str(i), "oct": fitted[i], "meta": {}}) for i in indices])
            x = batch["oct"].to(self.device)
            with torch.autocast(self.device.type, dtype=self.precision.autocast_dtype,
                                enabled=self.precision.autocast_dtype is not None):
                logits = self.model(x)
            probs = torch.sigmoid(logits.float())[:, 0:1]
            for j, i in enumerate(indices):
                shape = (fitted[i].shape[0], fitted[i].shape[2])
                one = probs[j : j + 1]
                if tuple(one.shape[-2:]) != shape:
                    one = torch.nn.functional.interpolate(one, size=shape, mode="bilinear", align_corners=False)
                out[i] = one[0, 0].cpu().numpy().astype(np.float32)
        return out  # type: ignore[return-value]


def _batches(volumes: list[np.ndarray], size: int) -> Iterator[list[int]]:
    """Indices of volumes in batches of one shape (in order of first appearance)."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, volume in enumerate(volumes):
        by_shape.setdefault(tuple(volume.shape), []).append(i)
    for indices in by_shape.values():
        for start in range(0, len(indices), size):
            yield indices[start : start + size]


def lesions(mask: np.ndarray) -> int:
    """Number of 8-connected lesion components of a 2D mask."""
    from scipy.ndimage import label

    return int(label(mask > 0, structure=np.ones((3, 3), int))[1])


def area_mm2(mask: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """Lesion area of an en-face ``(nB, W)`` mask of a raster volume: pixels x B-scan distance x A-scan pitch."""
    return float(np.count_nonzero(mask)) * float(spacing_mm[0]) * float(spacing_mm[2])


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks; both empty -> 1.0 (as in training)."""
    p, t = pred > 0, truth > 0
    total = int(p.sum() + t.sum())
    return 1.0 if total == 0 else 2.0 * float((p & t).sum()) / total


def hd95(pred: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """HD95 in mm on the en-face grid (nan when exactly one mask is empty; 0 when both are)."""
    from octssl.train.objectives import hd95_mm

    return hd95_mm(torch.from_numpy(pred > 0)[None], torch.from_numpy(truth > 0)[None],
                   (float(spacing_mm[0]), float(spacing_mm[2])))


def choose_threshold(probabilities: Sequence[np.ndarray], truths: Sequence[np.ndarray]) -> tuple[float, float]:
    """The threshold with the best pooled Dice over the volumes (one Dice of all their pixels, the rule
    validation uses: healthy eyes predicted empty cannot outvote missed lesions), and that Dice; ties go to
    the threshold nearest 0.5. (0.5, nan) when there are no volumes."""
    from octssl.train.objectives import best_threshold, counts_at_thresholds

    if not probabilities:
        return 0.5, math.nan
    masks = [torch.from_numpy(np.asarray(m) > 0) for m in truths]
    counts = [counts_at_thresholds(torch.from_numpy(np.asarray(p)), m) for p, m in zip(probabilities, masks, strict=True)]
    return best_threshold([int(m.sum()) for m in masks], [c[0] for c in counts], [c[1] for c in counts])


def measure(prob: np.ndarray, threshold: float, meta: dict[str, Any], truth: np.ndarray | None) -> dict[str, Any]:
    """One volume's row: area (raster only, else the reason), lesions, pixels, and against ``truth`` its area,
    Dice and HD95."""
    mask = prob >= threshold
    raster = bool(meta.get("raster", True))
    spacing = meta["spacing_mm"]
    row: dict[str, Any] = {
        "area_mm2": area_mm2(mask, spacing) if raster else None,
        "area_reason": None if raster else (meta.get("raster_reason") or f"{meta.get('scan_pattern')} scan: not an "
                                                                            "en-face raster"),
        "lesions": lesions(mask), "pixels": int(mask.sum()), "dice": None, "hd95_mm": None,
    }
    row["label_area_mm2"] = area_mm2(truth, spacing) if truth is not None and raster else None
    if truth is not None:
        row["dice"] = dice(mask, truth)
        value = hd95(mask, truth, spacing)
        row["hd95_mm"] = None if math.isnan(value) else value
    return row
