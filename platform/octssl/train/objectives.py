"""Training objectives and metrics: inter-modal reconstruction (SSIM) and en-face segmentation (Dice + BCE).

Both take logits `(B, K, nB, W)` from a model and a collated batch (`octssl.data.transforms.collate`):
targets `(B, 1, nB, W)` float in [0, 1] under the target's key, `id` (list) and `spacing_mm` `(B, 3)` in
(nB, D, W) order. Losses and metrics are computed in fp32 whatever the autocast state.

Conventions (documented in docs/models.md):
- reconstruction loss = 1 - SSIM(sigmoid(logits), target) (+ l1_weight * mean |sigmoid(logits) - target|):
  MONAI's SSIMLoss, 11x11 Gaussian window, sigma 1.5, data range 1. It is the paper's negative SSIM
  shifted by 1 (same gradients), so 0 means a perfect reconstruction. The FAF target is inverted
  (1 - faf: GA shows bright); SLO is used as is.
- segmentation loss = (soft Dice + BCE) / 2 on logits (MONAI DiceLoss(sigmoid=True, batch=True) +
  BCEWithLogits). The soft Dice is one ratio over the whole batch, not a mean of per-crop Dices: a crop
  without the lesion then adds its false positives to the denominator instead of scoring a whole Dice
  of 0 or 1 on its own, which for small lesions (RPD: most crops empty) rewarded predicting nothing.
- Segmentation metrics (Dice, pooled Dice and the threshold choice, HD95 in mm, pixel counts) are
  :mod:`octssl.apply.metrics`, shared with the sweep's test split, bundle export and ``octssl predict``;
  the objective only says which batch key and spacing they read.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.losses import DiceLoss, SSIMLoss
from monai.metrics import SSIMMetric

from octssl.apply.metrics import volume_rows
from octssl.errors import ConfigError, SampleError
from octssl.vocab import (
    FAF,
    GA,
    L1,
    PRIMARY_METRIC,
    RECONSTRUCTION,
    SEGMENTATION,
    SSIM,
    TARGETS,
)

SSIM_OPTIONS = {"spatial_dims": 2, "data_range": 1.0, "win_size": 11, "kernel_sigma": 1.5}


def _ids(batch: dict[str, Any], n: int) -> list[str]:
    ids = batch.get("id")
    return [str(i) for i in ids] if ids is not None else [f"#{i}" for i in range(n)]




class Objective:
    """A loss on (logits, batch) plus its per-volume metrics; `target` is the batch key it reads and
    `primary_metric` the metric (higher is better) that picks the best checkpoint and the best trial."""

    kind = "objective"

    @property
    def primary_metric(self) -> str:
        return PRIMARY_METRIC[self.kind]

    def __init__(self, target: str) -> None:
        self.target = target

    def target_tensor(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's target as fp32 on the logits' device, checked against the logits' shape."""
        if self.target not in batch:
            raise SampleError(f"batch {_ids(batch, logits.shape[0])} has no {self.target!r} target for "
                              f"{self.kind}; keys: {sorted(batch)}")
        target = torch.as_tensor(batch[self.target]).to(device=logits.device, dtype=torch.float32)
        if target.shape != logits.shape:
            raise SampleError(f"batch {_ids(batch, logits.shape[0])}: target {self.target!r} has shape "
                              f"{tuple(target.shape)}, logits have {tuple(logits.shape)}")
        return target

    def loss(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def check_enface(self, size: tuple[int, int], what: str) -> None:
        """ConfigError when an en-face ``size`` (nB, W), named ``what``, cannot be scored (checked before
        any worker starts)."""

    def per_volume(self, logits: torch.Tensor, batch: dict[str, Any]) -> list[dict[str, Any]]:
        raise NotImplementedError



class Reconstruction(Objective):
    """1 - SSIM between sigmoid(logits) and the (inverted FAF | SLO) image, optionally + L1."""

    kind = RECONSTRUCTION

    def __init__(self, target: str = FAF, l1_weight: float = 0.0) -> None:
        super().__init__(target)
        self.invert = target == FAF
        self.l1_weight = float(l1_weight)
        self.ssim_loss = SSIMLoss(**SSIM_OPTIONS)  # type: ignore[arg-type]  # monai's stubs type each keyword
        self.ssim_metric = SSIMMetric(**SSIM_OPTIONS, reduction="none")  # type: ignore[arg-type]

    def target_tensor(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        target = super().target_tensor(logits, batch)
        window = SSIM_OPTIONS["win_size"]
        if min(target.shape[-2:]) < window:
            raise SampleError(f"batch {_ids(batch, logits.shape[0])}: en-face size {tuple(target.shape[-2:])} "
                              f"is smaller than the {window}x{window} SSIM window")
        return 1.0 - target if self.invert else target

    def check_enface(self, size: tuple[int, int], what: str) -> None:
        window = int(SSIM_OPTIONS["win_size"])
        if min(size) < window:
            raise ConfigError(f"{what}={tuple(size)}: the en-face size is smaller than the {window}x{window} SSIM "
                              f"window of reconstruction; use at least {window} B-scans and A-scans")

    def loss(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        target = self.target_tensor(logits, batch)
        image = torch.sigmoid(logits.float())
        loss = self.ssim_loss(image, target)
        if self.l1_weight:
            loss = loss + self.l1_weight * (image - target).abs().mean()
        return loss

    @torch.no_grad()
    def per_volume(self, logits: torch.Tensor, batch: dict[str, Any]) -> list[dict[str, Any]]:
        target = self.target_tensor(logits, batch)
        image = torch.sigmoid(logits.float())
        ssim = torch.as_tensor(self.ssim_metric(image, target)).mean(dim=1)
        l1 = (image - target).abs().flatten(1).mean(dim=1)
        return [{"id": i, SSIM: float(s), L1: float(a)}
                for i, s, a in zip(_ids(batch, len(ssim)), ssim, l1, strict=True)]


class Segmentation(Objective):
    """(soft Dice + BCE) / 2 on logits (soft Dice over the batch); per volume Dice, HD95 (mm) and pixel
    counts at a probability threshold (see the module docstring for how val chooses it)."""

    kind = SEGMENTATION

    def __init__(self, target: str = GA) -> None:
        super().__init__(target)
        self.dice_loss = DiceLoss(sigmoid=True, batch=True)  # one Dice over the batch: see module docstring
        self.bce = torch.nn.BCEWithLogitsLoss()

    def loss(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        target = self.target_tensor(logits, batch)
        logits = logits.float()
        return (self.dice_loss(logits, target) + self.bce(logits, target)) / 2

    def enface_spacing(self, batch: dict[str, Any], n: int) -> torch.Tensor:
        """(B, 2) millimetres per pixel along (nB, W) from the batch's (nB, D, W) `spacing_mm`."""
        if "spacing_mm" not in batch:
            raise SampleError(f"batch {_ids(batch, n)} has no spacing_mm: HD95 in millimetres needs it")
        spacing = torch.as_tensor(batch["spacing_mm"], dtype=torch.float64).reshape(-1, 3)
        if spacing.shape[0] != n or not bool((spacing[:, [0, 2]] > 0).all()):
            raise SampleError(f"batch {_ids(batch, n)}: spacing_mm {spacing.tolist()} must be {n} positive triples")
        return spacing[:, [0, 2]]

    @torch.no_grad()
    def per_volume(self, logits: torch.Tensor, batch: dict[str, Any], threshold: float = 0.5) -> list[dict[str, Any]]:
        """Dice, HD95 and pixel counts at ``threshold`` (the val split's choice on the test split), and the
        counts at every one of ``THRESHOLDS`` from which :func:`average` chooses it on the val split."""
        target = self.target_tensor(logits, batch) > 0.5
        spacing = self.enface_spacing(batch, len(target))
        return volume_rows(torch.sigmoid(logits.float()), target, spacing, _ids(batch, len(target)), threshold)


def build_objective(kind: str = RECONSTRUCTION, target: str | None = None, l1_weight: float = 0.0) -> Objective:
    """Objective for `kind` ('reconstruction' | 'segmentation') reading batch[`target`]."""
    if kind not in TARGETS:
        raise ConfigError(f"objective kind {kind!r} is unknown; known: {', '.join(TARGETS)}")
    target = target or TARGETS[kind][0]
    if target not in TARGETS[kind]:
        raise ConfigError(f"objective {kind} cannot use target {target!r}; it takes {' or '.join(TARGETS[kind])}")
    if kind == RECONSTRUCTION:
        if l1_weight < 0:
            raise ConfigError(f"objective reconstruction: l1_weight={l1_weight} must be >= 0")
        return Reconstruction(target, l1_weight)
    if l1_weight:
        raise ConfigError("objective segmentation takes no l1_weight (it is a reconstruction option)")
    return Segmentation(target)


def per_volume_at_original(objective: Objective, logits: torch.Tensor, batch: dict[str, Any],
                           threshold: float = 0.5) -> list[dict[str, Any]]:
    """Per-volume metrics at each volume's original en-face resolution (segmentation: at ``threshold``).

    EvalTransform resizes volumes so nB and W are multiples of 16 and keeps the untouched masks and
    spacing in ``meta``; segmentation scores (Dice, HD95 in mm) are computed there, on the logits put back
    on each volume's grid by :func:`octssl.apply.predictor.on_grid` (as ``octssl predict`` does), not on
    nearest-resized masks. Other objectives score at the model's resolution.
    """
    from octssl.apply.predictor import on_grid

    metas = batch.get("meta") or []
    target = objective.target
    if not isinstance(objective, Segmentation):
        return objective.per_volume(logits, batch)
    if not all(target in (m.get("orig_masks") or {}) for m in metas):
        return objective.per_volume(logits, batch, threshold)
    rows: list[dict[str, Any]] = []
    for i, meta in enumerate(metas):
        mask = torch.as_tensor(meta["orig_masks"][target], dtype=torch.float32)[None, None]
        one = on_grid(logits[i : i + 1].float(), tuple(mask.shape[-2:]))
        spacing = meta.get("orig_spacing_mm", meta.get("spacing_mm"))
        original = {"id": [batch["id"][i]], target: mask.to(one.device), "spacing_mm": torch.tensor([list(spacing)])}
        rows += objective.per_volume(one, original, threshold)
    return rows
