"""The platform's vocabulary, defined once: array keys, tasks and targets, objectives, metrics, splits.

Every module that names a modality, a task or a metric imports it from here; configs validate against
the ``Literal`` types below (kept equal to the tuples by the assertions at the end).
"""

from __future__ import annotations

from typing import Final, Literal, get_args

VOLUME: Final = "oct"
FAF: Final = "faf"
SLO: Final = "slo"
GA: Final = "ga"
RPD: Final = "rpd"
#: en-face images a volume can be paired with: the reconstruction targets of pretraining
ENFACE_IMAGES = (FAF, SLO)
#: binary en-face masks: the segmentation tasks of fine-tuning
MASKS = (GA, RPD)
ENFACE_KEYS = ENFACE_IMAGES + MASKS
ARRAY_KEYS = (VOLUME, *ENFACE_KEYS)

RECONSTRUCTION: Final = "reconstruction"
SEGMENTATION: Final = "segmentation"
TARGETS = {RECONSTRUCTION: ENFACE_IMAGES, SEGMENTATION: MASKS}

SSIM: Final = "ssim"
L1: Final = "l1"
DICE: Final = "dice"
HD95: Final = "hd95_mm"
#: one Dice over all the volumes of a split: 2 * sum(overlap) / (sum(truth) + sum(prediction)) in pixels
DICE_POOLED: Final = "dice_pooled"
#: per-volume pixel counts behind DICE_POOLED: lesion pixels in the truth, in the prediction, in both
TRUTH_PX: Final = "truth_px"
PRED_PX: Final = "pred_px"
OVERLAP_PX: Final = "overlap_px"
#: the probability threshold a segmentation model is operated at: chosen on the val split
THRESHOLD: Final = "threshold"
#: the metric that chooses the best checkpoint and the best trial (higher is better). Segmentation uses
#: the pooled Dice: an empty prediction scores 0 on it as soon as one volume shows the lesion, while the
#: mean of per-volume Dices gives every healthy eye predicted empty a whole 1 (small lesions collapsed).
PRIMARY_METRIC = {RECONSTRUCTION: SSIM, SEGMENTATION: DICE_POOLED}

SPLITS = ("train", "val", "test")
TRAIN, VAL, TEST = SPLITS

Target = Literal["faf", "slo", "ga", "rpd"]
Task = Literal["ga", "rpd"]
ObjectiveKind = Literal["reconstruction", "segmentation"]

assert get_args(Target) == ENFACE_KEYS and get_args(Task) == MASKS
assert get_args(ObjectiveKind) == tuple(TARGETS)


def objective_of(target: str) -> str:
    """The objective kind that trains ``target`` (``faf`` -> reconstruction, ``ga`` -> segmentation)."""
    for kind, targets in TARGETS.items():
        if target in targets:
            return kind
    raise ValueError(f"unknown target {target!r}; expected one of {ENFACE_KEYS}")
