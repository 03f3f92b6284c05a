"""Objectives on known cases: SSIM, FAF inversion, L1 term, Dice edge cases, HD95 in millimetres."""

from __future__ import annotations

import math

import pytest
import torch

from octssl.apply.metrics import average
from octssl.errors import ConfigError, SampleError
from octssl.train.objectives import build_objective

EMPTY = torch.zeros(1, 1, 16, 24)


def logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


def image_batch(key: str, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(2, 1, 40, 72, generator=gen), 5, 1, 2)
    return {key: smooth[..., :32, :64], "id": ["a", "b"]}


def test_ssim_of_an_image_with_itself_is_one() -> None:
    objective = build_objective("reconstruction", target="slo")
    batch = image_batch("slo")
    logits = logit(batch["slo"])
    assert average(objective.per_volume(logits, batch))["ssim"] == pytest.approx(1.0, abs=1e-4)
    assert float(objective.loss(logits, batch)) == pytest.approx(0.0, abs=1e-4)


def test_ssim_decreases_with_noise() -> None:
    objective = build_objective("reconstruction", target="slo")
    batch = image_batch("slo")
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(batch["slo"].shape, generator=gen)
    ssims = [average(objective.per_volume(logit(batch["slo"] + sigma * noise), batch))["ssim"]
             for sigma in (0.0, 0.05, 0.1, 0.3)]
    assert all(a > b for a, b in zip(ssims, ssims[1:], strict=False)), ssims
    losses = [float(objective.loss(logit(batch["slo"] + s * noise), batch)) for s in (0.0, 0.05, 0.1, 0.3)]
    assert all(a < b for a, b in zip(losses, losses[1:], strict=False)), losses


def test_faf_target_is_inverted_slo_is_not() -> None:
    batch = image_batch("faf")
    faf = build_objective("reconstruction", target="faf")
    assert float(faf.loss(logit(1 - batch["faf"]), batch)) == pytest.approx(0.0, abs=1e-4)
    assert float(faf.loss(logit(batch["faf"]), batch)) > 0.5
    assert faf.target == "faf"


def test_l1_term_adds_the_mean_absolute_error() -> None:
    batch = image_batch("slo")
    logits = logit(batch["slo"].flip(-1))
    plain = build_objective("reconstruction", target="slo").loss(logits, batch)
    with_l1 = build_objective("reconstruction", target="slo", l1_weight=2.0).loss(logits, batch)
    mae = (batch["slo"].flip(-1) - batch["slo"]).abs().mean()
    assert float(with_l1 - plain) == pytest.approx(2 * float(mae), rel=1e-3)


def test_segmentation_loss_at_zero_logits() -> None:
    target = torch.zeros(1, 1, 8, 8)
    target[..., :4, :] = 1  # half the pixels
    batch = {"ga": target, "id": ["a"]}
    loss = float(build_objective("segmentation", target="ga").loss(torch.zeros_like(target), batch))
    # sigmoid(0) = 0.5 everywhere: BCE = ln 2; soft Dice = 1 - 2*0.5*32 / (0.5*64 + 32) = 0.5 (smooth 1e-5).
    assert loss == pytest.approx((math.log(2) + 0.5) / 2, rel=1e-4)
    confident = float(build_objective("segmentation", target="ga").loss(40 * (2 * target - 1), batch))
    assert confident < 1e-3


def seg_batch(pred_mask: torch.Tensor, true_mask: torch.Tensor, spacing=(0.12, 0.004, 0.02)) -> tuple:
    batch = {"rpd": true_mask, "id": ["v"], "spacing_mm": torch.tensor([spacing])}
    return 20 * (2 * pred_mask - 1), batch


def test_dice_edge_cases() -> None:
    objective = build_objective("segmentation", target="rpd")
    blob = EMPTY.clone()
    blob[..., 2:4, 3:5] = 1  # 4 pixels
    shifted = EMPTY.clone()
    shifted[..., 2:4, 4:6] = 1  # 4 pixels, 2 shared
    cases = [(EMPTY, EMPTY, 1.0), (EMPTY, blob, 0.0), (blob, EMPTY, 0.0), (blob, blob, 1.0), (shifted, blob, 0.5)]
    for pred, true, expected in cases:
        logits, batch = seg_batch(pred, true)
        assert average(objective.per_volume(logits, batch))["dice"] == pytest.approx(expected), (pred.sum(), true.sum())


def test_hd95_in_millimetres_uses_the_en_face_spacing() -> None:
    objective = build_objective("segmentation", target="rpd")
    row, shifted_row = EMPTY.clone(), EMPTY.clone()
    row[..., 5, 2:20] = 1
    shifted_row[..., 8, 2:20] = 1  # 3 B-scans away everywhere
    logits, batch = seg_batch(shifted_row, row, spacing=(0.12, 0.004, 0.02))
    assert average(objective.per_volume(logits, batch))["hd95_mm"] == pytest.approx(3 * 0.12)

    column, shifted_column = EMPTY.clone(), EMPTY.clone()
    column[..., 2:14, 6] = 1
    shifted_column[..., 2:14, 10] = 1  # 4 A-scans away everywhere
    logits, batch = seg_batch(shifted_column, column, spacing=(0.12, 0.004, 0.02))
    assert average(objective.per_volume(logits, batch))["hd95_mm"] == pytest.approx(4 * 0.02)


def test_hd95_when_masks_are_empty() -> None:
    objective = build_objective("segmentation", target="rpd")
    blob = EMPTY.clone()
    blob[..., 2:6, 3:9] = 1
    (l_both, b_both), (l_one, b_one), (l_same, b_same) = (
        seg_batch(EMPTY, EMPTY), seg_batch(EMPTY, blob), seg_batch(blob, blob))
    assert objective.per_volume(l_both, b_both)[0]["hd95_mm"] == 0.0
    assert math.isnan(objective.per_volume(l_one, b_one)[0]["hd95_mm"])
    # Aggregation skips undefined volumes and counts them.
    logits = torch.cat([l_one, l_same])
    batch = {"rpd": torch.cat([b_one["rpd"], b_same["rpd"]]), "id": ["one-empty", "same"],
             "spacing_mm": torch.tensor([[0.1, 0.004, 0.01]] * 2)}
    metrics = average(objective.per_volume(logits, batch))
    assert metrics["hd95_mm"] == 0.0 and metrics["hd95_undefined"] == 1.0
    assert metrics["dice"] == pytest.approx(0.5)


def test_configuration_and_batch_errors() -> None:
    with pytest.raises(ConfigError, match="cannot use target 'ga'"):
        build_objective("reconstruction", target="ga")
    with pytest.raises(ConfigError, match="unknown"):
        build_objective("contrastive")
    segmentation = build_objective("segmentation", target="ga")
    logits = torch.zeros(1, 1, 16, 24)
    with pytest.raises(SampleError, match="no 'ga' target"):
        segmentation.loss(logits, {"rpd": logits, "id": ["x"]})
    with pytest.raises(SampleError, match="shape"):
        segmentation.loss(logits, {"ga": torch.zeros(1, 1, 16, 20), "id": ["x"]})
    with pytest.raises(SampleError, match="spacing_mm"):
        segmentation.per_volume(logits, {"ga": logits, "id": ["x"]})
    with pytest.raises(SampleError, match="SSIM window"):
        build_objective("reconstruction", target="slo").loss(torch.zeros(1, 1, 8, 64), {"slo": torch.zeros(1, 1, 8, 64)})


def test_segmentation_loss_prefers_finding_a_small_lesion_to_predicting_nothing() -> None:
    """The small-lesion collapse, cheaply: in a batch where one crop of four holds a small lesion (RPD-like),
    finding it with as many false-positive pixels again in every empty crop must cost less than an empty
    prediction. A per-crop soft Dice scores each empty crop's false alarm as a whole Dice of 0 and so
    prefers predicting nothing (the RPD cells of the demo collapsed to empty masks)."""
    import torch

    from octssl.train.objectives import Segmentation

    target = torch.zeros(4, 1, 16, 32)
    target[0, 0, 6:10, 10:14] = 1.0  # 16 of 512 pixels, in one crop of four
    batch = {"rpd": target, "id": ["a", "b", "c", "d"]}
    empty = torch.full_like(target, -30.0)  # nothing, confidently
    found = torch.where(target > 0, 30.0, -30.0)
    found[1:, 0, 0:4, 0:4] = 0.0  # 16 undecided pixels (probability 0.5) in each empty crop
    loss = Segmentation("rpd").loss
    assert float(loss(found, batch)) < float(loss(empty, batch))


def test_pooled_dice_scores_an_empty_model_zero_where_the_mean_rewards_it() -> None:
    """Validation picks checkpoints on the pooled Dice: with one lesion among four volumes an empty
    prediction has a mean per-volume Dice of 0.75 (three healthy eyes count 1 each) but a pooled Dice of
    0, below a model that finds half the lesion with a few false alarms on a healthy eye."""
    from octssl.train.objectives import PRIMARY_METRIC
    from octssl.vocab import SEGMENTATION

    objective = build_objective("segmentation", target="rpd")
    truth = torch.zeros(4, 1, 16, 32)
    truth[0, 0, 4:8, 4:12] = 1.0  # 32 lesion pixels in volume 0
    batch = {"rpd": truth, "id": list("abcd"), "spacing_mm": torch.tensor([[0.1, 0.004, 0.01]] * 4)}
    empty = average(objective.per_volume(torch.full_like(truth, -5.0), batch))
    found = torch.full_like(truth, -5.0)
    found[0, 0, 4:8, 4:8] = 5.0  # half the lesion
    found[1, 0, 0:2, 0:4] = 5.0  # 8 false-positive pixels on a healthy eye
    half = average(objective.per_volume(found, batch))
    assert PRIMARY_METRIC[SEGMENTATION] == "dice_pooled"
    assert empty["dice"] == pytest.approx(0.75) and empty["dice_pooled"] == 0.0
    assert half["dice_pooled"] == pytest.approx(2 * 16 / (32 + 24))
    assert half["dice"] < empty["dice"] and half["dice_pooled"] > empty["dice_pooled"]
    assert "truth_px" not in half  # pixel counts are summed into the pooled Dice, never averaged
    all_healthy = average(objective.per_volume(torch.full_like(truth, -5.0), {**batch, "rpd": torch.zeros_like(truth)}))
    assert all_healthy["dice_pooled"] == 1.0


def test_threshold_chosen_on_pooled_dice_finds_a_faint_lesion() -> None:
    """A model whose lesion probabilities are low (0.3) on the one sick eye of four: the best mean Dice
    would take a threshold above 0.3 (everything empty: 0.75), the pooled Dice takes one that finds it."""
    import numpy as np

    from octssl.apply.metrics import choose_threshold

    truths = [np.zeros((8, 8), bool) for _ in range(4)]
    truths[0][2:6, 2:6] = True
    probs = [np.full((8, 8), 0.05, np.float32) for _ in range(4)]
    probs[0][2:6, 2:6] = 0.3
    threshold, score = choose_threshold(probs, truths)
    assert 0.05 < threshold <= 0.3 and score == pytest.approx(1.0)
