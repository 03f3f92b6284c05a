"""Segmentation metrics, in one place: per-volume Dice, HD95 (mm), pixel counts at every candidate threshold,
the pooled Dice and the threshold choice by best pooled Dice, lesion counts and areas.

Used by the trainer's validation (through :mod:`octssl.train.objectives`, which keeps the losses), the
sweep's test split, bundle export and ``octssl predict``: a number reported anywhere is computed here.

Conventions (documented in docs/models.md):
- Dice per volume at a probability threshold; both masks empty -> 1.0. On the val split the threshold is
  chosen: each volume reports its pixel counts (truth; prediction and overlap at each of ``THRESHOLDS``), and
  :func:`average` takes the threshold with the best *pooled* Dice (2 * sum overlap / (sum truth + sum
  prediction) over all volumes; 1.0 when no volume has a lesion and none is predicted), reporting it as
  ``threshold`` with ``dice_pooled`` and the mean per-volume ``dice`` there. The pooled Dice is the primary
  metric of segmentation: an empty model scores 0 on it however many healthy eyes there are, where the
  mean Dice gives each of them a whole 1 (small lesions such as RPD collapsed to empty masks under it).
  The threshold is chosen once, on val, where the checkpoint is chosen; the test split and every bundle use it.
- HD95 in millimetres on the en-face grid (spacing nB, W from ``spacing_mm``); both masks empty -> 0.0;
  exactly one empty -> nan (undefined). :func:`average` averages HD95 over the volumes where it is defined
  and reports how many were not as ``hd95_undefined``; ``hd95_mm`` is nan when none is defined.
- Area in mm^2 from the en-face pixel size (raster volumes only: B-scans of line, circle and radial scans
  are not an en-face raster, so their pixels have no area); lesions are 8-connected components.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

from octssl.vocab import DICE, DICE_POOLED, HD95, OVERLAP_PX, PRED_PX, THRESHOLD, TRUTH_PX


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



def volume_rows(prob: torch.Tensor, truth: torch.Tensor, spacing: torch.Tensor, ids: Sequence[str],
                threshold: float = 0.5) -> list[dict[str, Any]]:
    """Per volume of ``(B, 1, nB, W)`` probabilities against boolean ``truth`` (spacing ``(B, 2)`` mm along
    nB, W): Dice, HD95 and pixel counts at ``threshold``, and the counts at every one of ``THRESHOLDS`` from
    which :func:`average` chooses the threshold on the val split."""
    pred = prob >= threshold
    dices = compute_dice(pred.float(), truth.float(), include_background=True, ignore_empty=False)
    rows = []
    for i, sample_id in enumerate(ids):
        rows.append({"id": sample_id, DICE: float(dices[i].mean()),
                     HD95: hd95_mm(pred[i], truth[i], tuple(spacing[i].tolist())),
                     TRUTH_PX: int(truth[i].sum()), PRED_PX: int(pred[i].sum()),
                     OVERLAP_PX: int((pred[i] & truth[i]).sum())})
        rows[-1][PRED_AT], rows[-1][OVERLAP_AT] = counts_at_thresholds(prob[i], truth[i])
    return rows


def pooled(rows: Sequence[dict[str, Any]]) -> dict[str, float | int | None]:
    """Test-split summary of per-volume rows scored at one threshold: mean ``dice``, ``dice_pooled`` from
    the summed pixel counts, mean defined ``hd95_mm``, ``hd95_undefined`` and the count ``n``."""
    hd = [float(r[HD95]) for r in rows if r.get(HD95) is not None and not math.isnan(float(r[HD95]))]
    truth, pred, overlap = (sum(int(r[k]) for r in rows) for k in (TRUTH_PX, PRED_PX, OVERLAP_PX))
    return {DICE: float(np.mean([r[DICE] for r in rows])) if rows else None,
            DICE_POOLED: _dice(overlap, truth, pred) if rows else None,
            HD95: float(np.mean(hd)) if hd else None, HD95_UNDEFINED: len(rows) - len(hd), "n": len(rows)}


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
    return _dice(int((p & t).sum()), int(t.sum()), int(p.sum()))


def hd95(pred: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """HD95 in mm on the en-face grid of a volume with (nB, D, W) ``spacing_mm``."""
    return hd95_mm(torch.from_numpy(pred > 0)[None], torch.from_numpy(truth > 0)[None],
                   (float(spacing_mm[0]), float(spacing_mm[2])))


def choose_threshold(probabilities: Sequence[np.ndarray], truths: Sequence[np.ndarray]) -> tuple[float, float]:
    """The threshold with the best pooled Dice over the volumes (the rule validation uses), and that Dice;
    (0.5, nan) when there are no volumes."""
    if not probabilities:
        return 0.5, math.nan
    masks = [torch.from_numpy(np.asarray(m) > 0) for m in truths]
    counts = [counts_at_thresholds(torch.from_numpy(np.asarray(p)), m) for p, m in zip(probabilities, masks, strict=True)]
    return best_threshold([int(m.sum()) for m in masks], [c[0] for c in counts], [c[1] for c in counts])


def measure(prob: np.ndarray, threshold: float, meta: dict[str, Any], truth: np.ndarray | None) -> dict[str, Any]:
    """One volume's prediction row metrics: area (raster only, else the reason), lesions, pixels, and against
    ``truth`` its area, Dice and HD95."""
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
