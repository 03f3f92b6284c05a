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
- Dice per volume at a probability threshold; both masks empty -> 1.0. On the val split the threshold is
  chosen: each volume reports its pixel counts (truth; prediction and overlap at each of `THRESHOLDS`), and
  `average()` takes the threshold with the best *pooled* Dice (2 * sum overlap / (sum truth + sum
  prediction) over all volumes; 1.0 when no volume has a lesion and none is predicted), reporting it as
  `threshold` with `dice_pooled` and the mean per-volume `dice` there. The pooled Dice is the primary
  metric of segmentation: an empty model scores 0 on it however many healthy eyes there are, where the
  mean Dice gives each of them a whole 1 (small lesions such as RPD collapsed to empty masks under it).
  The test split is scored at the threshold the chosen trial took on val.
- HD95 in millimetres on the en-face grid (spacing nB, W from `spacing_mm`); both masks empty -> 0.0;
  exactly one empty -> nan (undefined). `average()` averages HD95 over the volumes where it is defined
  and reports how many were not as `hd95_undefined`; `hd95_mm` is nan when none is defined. On the val
  split HD95 is measured at 0.5 (it is reported, never used to choose); on the test split at `threshold`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.losses import DiceLoss, SSIMLoss
from monai.metrics import SSIMMetric, compute_dice, compute_hausdorff_distance

from octssl.errors import ConfigError, SampleError
from octssl.vocab import (
    DICE,
    DICE_POOLED,
    FAF,
    GA,
    HD95,
    L1,
    OVERLAP_PX,
    PRED_PX,
    PRIMARY_METRIC,
    RECONSTRUCTION,
    SEGMENTATION,
    SSIM,
    TARGETS,
    THRESHOLD,
    TRUTH_PX,
    VOLUME,
)

SSIM_OPTIONS = {"spatial_dims": 2, "data_range": 1.0, "win_size": 11, "kernel_sigma": 1.5}


def _ids(batch: dict[str, Any], n: int) -> list[str]:
    ids = batch.get("id")
    return [str(i) for i in ids] if ids is not None else [f"#{i}" for i in range(n)]


def average(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of each numeric per-volume metric over the volumes where it is defined (nan when none is), and
    ``hd95_undefined``: how many volumes had no HD95 (a mask empty on one side only) when HD95 is scored,
    and for segmentation rows the operating ``threshold`` chosen on them (best pooled Dice), with
    ``dice_pooled`` and the mean per-volume ``dice`` at it."""
    keys = sorted({k for r in rows for k, v in r.items() if _is_number(v) and k not in PIXEL_COUNTS})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nan columns average to nan, said by the count
        out = {k: float(np.nanmean([r.get(k, np.nan) for r in rows])) for k in keys}
    if HD95 in keys:
        out[HD95_UNDEFINED] = float(sum(math.isnan(r.get(HD95, math.nan)) for r in rows))
    if rows and all(PRED_AT in r for r in rows):
        threshold, pooled = best_threshold([r[TRUTH_PX] for r in rows], [r[PRED_AT] for r in rows],
                                           [r[OVERLAP_AT] for r in rows])
        k = THRESHOLDS.index(threshold)
        out[THRESHOLD], out[DICE_POOLED] = threshold, pooled
        out[DICE] = float(np.mean([_dice(r[OVERLAP_AT][k], r[TRUTH_PX], r[PRED_AT][k]) for r in rows]))
    return out


#: probability thresholds tried when the operating threshold is chosen on the val split
THRESHOLDS = tuple(round(float(t), 2) for t in np.arange(0.05, 0.951, 0.05))
PRED_AT, OVERLAP_AT = "pred_px_at", "overlap_px_at"  # per-volume counts at each of THRESHOLDS
PIXEL_COUNTS = (TRUTH_PX, PRED_PX, OVERLAP_PX)  # summed into dice_pooled, never averaged


def _dice(overlap: int, truth: int, pred: int) -> float:
    return 2.0 * overlap / (truth + pred) if truth + pred else 1.0


def best_threshold(truth_px: Sequence[int], pred_at: Sequence[Sequence[int]],
                   overlap_at: Sequence[Sequence[int]]) -> tuple[float, float]:
    """The threshold of ``THRESHOLDS`` with the best pooled Dice over the volumes whose pixel counts are
    given (truth per volume; prediction and overlap per volume and threshold), and that Dice. Ties go to
    the threshold nearest 0.5. The pooled Dice is one Dice of all the pixels: 1.0 when all are empty."""
    truth = sum(int(t) for t in truth_px)
    scores = {}
    for k, threshold in enumerate(THRESHOLDS):
        scores[threshold] = _dice(sum(int(o[k]) for o in overlap_at), truth, sum(int(p[k]) for p in pred_at))
    best = max(scores, key=lambda t: (round(scores[t], 9), -abs(t - 0.5)))
    return best, scores[best]


def counts_at_thresholds(prob: torch.Tensor, truth: torch.Tensor) -> tuple[list[int], list[int]]:
    """Predicted and overlapping pixel counts of one probability map against its boolean truth, at each
    of ``THRESHOLDS``."""
    prob, truth = prob.flatten(), truth.flatten()
    pred = [int((prob >= t).sum()) for t in THRESHOLDS]
    overlap = [int(((prob >= t) & truth).sum()) for t in THRESHOLDS]
    return pred, overlap


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)


HD95_UNDEFINED = "hd95_undefined"


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
        prob = torch.sigmoid(logits.float())
        pred = prob >= threshold
        dice = compute_dice(pred.float(), target.float(), include_background=True, ignore_empty=False)
        spacing = self.enface_spacing(batch, len(pred))
        rows = []
        for i, sample_id in enumerate(_ids(batch, len(pred))):
            rows.append({"id": sample_id, DICE: float(dice[i].mean()),
                         HD95: hd95_mm(pred[i], target[i], tuple(spacing[i].tolist())),
                         TRUTH_PX: int(target[i].sum()), PRED_PX: int(pred[i].sum()),
                         OVERLAP_PX: int((pred[i] & target[i]).sum())})
            rows[-1][PRED_AT], rows[-1][OVERLAP_AT] = counts_at_thresholds(prob[i], target[i])
        return rows


def hd95_mm(pred: torch.Tensor, target: torch.Tensor, spacing: tuple[float, float]) -> float:
    """HD95 in mm between two (K, nB, W) boolean masks, averaged over channels; see module docstring for empties."""
    values = []
    for p, t in zip(pred, target, strict=True):
        p_any, t_any = bool(p.any()), bool(t.any())
        if not p_any and not t_any:
            values.append(0.0)
        elif p_any != t_any:
            values.append(math.nan)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                hd = compute_hausdorff_distance(p[None, None].float(), t[None, None].float(),
                                                include_background=True, percentile=95, spacing=spacing)
            values.append(float(hd))
    return math.nan if any(math.isnan(v) for v in values) else sum(values) / len(values)


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
    spacing in ``meta``; segmentation scores (Dice, HD95 in mm) are computed there, on the logits resized
    back (bilinear), not on nearest-resized masks. Other objectives score at the model's resolution.
    """
    metas = batch.get("meta") or []
    target = objective.target
    if not isinstance(objective, Segmentation):
        return objective.per_volume(logits, batch)
    if not all(target in (m.get("orig_masks") or {}) for m in metas):
        return objective.per_volume(logits, batch, threshold)
    rows: list[dict[str, Any]] = []
    for i, meta in enumerate(metas):
        mask = torch.as_tensor(meta["orig_masks"][target], dtype=torch.float32)[None, None]
        one = logits[i : i + 1].float()
        if tuple(one.shape[-2:]) != tuple(mask.shape[-2:]):
            one = torch.nn.functional.interpolate(one, size=tuple(mask.shape[-2:]), mode="bilinear", align_corners=False)
        spacing = meta.get("orig_spacing_mm", meta.get("spacing_mm"))
        original = {"id": [batch["id"][i]], target: mask.to(one.device), "spacing_mm": torch.tensor([list(spacing)])}
        rows += objective.per_volume(one, original, threshold)
    return rows


def score_batch(model: Any, objective: Any, batch: dict[str, Any],
                threshold: float = 0.5) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Forward one evaluation batch; (fp32 logits, per-volume metrics at each volume's original en-face size).
    The one scoring path of validation here and of the sweep's test split (which passes the segmentation
    ``threshold`` its trial chose on the val split)."""
    logits = model(batch[VOLUME]).float()
    return logits, per_volume_at_original(objective, logits, batch, threshold)
