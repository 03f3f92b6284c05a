"""The one way a segmentation model is run on whole volumes: :class:`Predictor`.

Every path that turns volumes into en-face probabilities goes through it: the trainer's validation (with its
DeepSpeed engine as the model), the sweep's test split and figures, and ``octssl predict`` with a bundle.
What it does, in order:

1. **Input contract** (:meth:`Predictor.model_input`): with an input ``grid`` (a bundle's training grid
   nB x D x W), a raster volume is resampled onto it whatever its source (corpus entry or device file), so
   one scan gives one area; a line/circle/radial scan keeps its B-scans and only its depth is fitted (its
   retina cropped to the ingest depth window, then resized to D). Without a grid (validation, the sweep:
   volumes already on the training grid) volumes go in as they are.
2. **Normalisation and size**: the evaluation transform of training (z-score per B-scan, nB and W resized
   to multiples of 16 by ``EvalTransform``).
3. **Precision**: the training policy of :mod:`octssl.models.precision` (bf16 autocast on GPU, fp32 on CPU);
   logits come back in fp32.
4. **Batching**: volumes of one shape together, ``batch_size`` at a time.
5. **Back on the volume's grid**: logits resized (bilinear) to each volume's own en-face ``(nB, W)``
   grid, then the sigmoid; metrics (:mod:`octssl.apply.metrics`) are taken there.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from octssl.ingest.grid import DEPTH_WINDOW_MM, resize, retina_window
from octssl.models.precision import Precision, on_gpu, resolve_precision

MULTIPLE = 16  # nB and W are resized to multiples of this before the model (the FPN's stride)


def fit_depth(volume: np.ndarray, depth: int, depth_spacing_mm: float, raster: bool) -> np.ndarray:
    """``volume`` with ``depth`` rows: non-raster scans cropped to the retina window first, then resized."""
    if volume.shape[1] == depth:
        return volume
    if not raster:
        volume = volume[:, retina_window(volume, depth_spacing_mm, DEPTH_WINDOW_MM), :]
    return resize(volume, (volume.shape[0], depth, volume.shape[2]))


def on_grid(logits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``(B, K, h, w)`` logits resized (bilinear) to the en-face ``shape`` (nB, W) of the volume they score."""
    if tuple(logits.shape[-2:]) == tuple(shape):
        return logits
    return torch.nn.functional.interpolate(logits, size=tuple(shape), mode="bilinear", align_corners=False)


class Predictor:
    """A model ready for whole volumes. ``model`` is used as given (a DeepSpeed engine during validation);
    :meth:`for_model` puts a plain module in eval mode on this process's device."""

    def __init__(self, model: Any, *, precision: Precision, device: torch.device | None = None,
                 grid: tuple[int, int, int] | None = None, batch_size: int = 4) -> None:
        self.model, self.precision, self.device = model, precision, device
        self.grid, self.batch_size = grid, max(1, batch_size)

    @classmethod
    def for_model(cls, model: torch.nn.Module, *, grid: tuple[int, int, int] | None = None, gpu: bool | None = None,
                  batch_size: int = 4) -> Predictor:
        """A Predictor over ``model`` in eval mode, on the GPU when this process has one (``gpu`` overrides)."""
        use_gpu = on_gpu() if gpu is None else (gpu and torch.cuda.is_available())
        device = torch.device("cuda") if use_gpu else torch.device("cpu")
        return cls(model.to(device).eval(), precision=resolve_precision("auto", gpu=use_gpu), device=device,
                   grid=grid, batch_size=batch_size)

    def model_input(self, volume: np.ndarray, spacing_mm: Sequence[float], raster: bool) -> np.ndarray:
        """The input contract: ``volume`` as the model sees it (see the module docstring, step 1)."""
        volume = np.asarray(volume)
        if self.grid is None:
            return volume
        if raster:
            return volume if volume.shape == tuple(self.grid) else resize(volume, self.grid)
        return fit_depth(volume, self.grid[1], float(spacing_mm[1]), raster=False)

    def input_shape(self, shape: tuple[int, ...], raster: bool) -> tuple[int, ...]:
        """The (nB, D, W) a volume of ``shape`` is given to the model as (before the multiple-of-16 resize)."""
        if self.grid is None:
            return tuple(shape)
        return tuple(self.grid) if raster else (shape[0], self.grid[1], shape[2])

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits of a collated ``(B, 1, nB, D, W)`` batch under the precision policy."""
        if self.device is not None:
            x = x.to(self.device)
        with torch.autocast(x.device.type, dtype=self.precision.autocast_dtype,
                            enabled=self.precision.autocast_dtype is not None):
            return self.model(x).float()

    @torch.no_grad()
    def probabilities(self, volumes: Sequence[np.ndarray], spacings: Sequence[Sequence[float]],
                      rasters: Sequence[bool] | None = None) -> list[np.ndarray]:
        """Sigmoid probabilities ``(nB, W)`` float32 on each uint8 volume's own en-face grid."""
        from octssl.data.transforms import EvalTransform, collate

        transform = EvalTransform(multiple=MULTIPLE, targets=())
        inputs = [self.model_input(v, s, True if rasters is None else rasters[i])
                  for i, (v, s) in enumerate(zip(volumes, spacings, strict=True))]
        out: list[np.ndarray | None] = [None] * len(inputs)
        for indices in _batches(inputs, self.batch_size):
            batch = collate([transform({"id": str(i), "oct": inputs[i], "meta": {}}) for i in indices])
            logits = self.logits(batch["oct"])[:, 0:1]
            for j, i in enumerate(indices):
                shape = (np.shape(volumes[i])[0], np.shape(volumes[i])[2])
                out[i] = torch.sigmoid(on_grid(logits[j : j + 1], shape))[0, 0].cpu().numpy().astype(np.float32)
        return out  # type: ignore[return-value]


def _batches(volumes: list[np.ndarray], size: int) -> Iterator[list[int]]:
    """Indices of volumes in batches of one shape (in order of first appearance)."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, volume in enumerate(volumes):
        by_shape.setdefault(tuple(volume.shape), []).append(i)
    for indices in by_shape.values():
        for start in range(0, len(indices), size):
            yield indices[start : start + size]
