"""Paired crop/flip/rotation, z-score per B-scan, intensity augmentation, eval resize and collate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from octssl.data.transforms import EvalTransform, TrainTransform, collate, zscore_bscans
from octssl.errors import SampleError


def _sample(nb=8, d=6, w=16, sid="p0-OD-v0", seed=0, **meta) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "id": sid,
        "oct": rng.integers(0, 256, (nb, d, w), dtype=np.uint8),
        "faf": rng.integers(0, 256, (nb, w), dtype=np.uint8),
        "ga": (rng.random((nb, w)) < 0.3).astype(np.uint8),
        "meta": {"spacing_mm": (0.12, 0.004, 0.011), **meta},
    }


def _marked(nb=8, d=6, w=16, at=(4, 3, 8)) -> dict:
    """Zeros everywhere except one bright voxel and the same bright en-face pixel in each target."""
    b, z, a = at
    sample = {"id": "marker", "oct": np.zeros((nb, d, w), np.uint8), "meta": {}}
    sample["oct"][b, z, a] = 255
    for key, value in (("faf", 255), ("ga", 1)):
        sample[key] = np.zeros((nb, w), np.uint8)
        sample[key][b, a] = value
    return sample


def test_crop_and_flips_move_volume_and_targets_together():
    seen_flips, seen_positions = set(), set()
    for epoch in range(40):
        sample = _marked()
        sample["meta"]["epoch"] = epoch
        out = TrainTransform(crop=(6, 12), targets=("faf", "ga"), seed=3)(sample)
        assert out["oct"].shape == (1, 6, 6, 12)
        assert out["faf"].shape == out["ga"].shape == (1, 6, 12)
        enface = out["oct"][0].max(axis=1)  # the marker is the volume's brightest voxel after any aug
        pos = np.unravel_index(np.argmax(enface), enface.shape)
        assert np.unravel_index(np.argmax(out["faf"][0]), (6, 12)) == pos
        assert np.unravel_index(np.argmax(out["ga"][0]), (6, 12)) == pos
        assert out["faf"][0][pos] == 1.0 and out["ga"][0][pos] == 1.0
        assert out["faf"][0].sum() == 1.0 and out["ga"][0].sum() == 1.0
        seen_flips.add(out["meta"]["flips"])
        seen_positions.add(pos)
    assert len(seen_flips) == 4, "all four flip combinations should occur in 40 draws"
    assert len(seen_positions) > 4, "the crop origin should vary"


def test_no_augmentation_is_plain_zscore_and_unit_targets():
    sample = _sample()
    out = TrainTransform(crop=None, targets=("faf", "ga"), flips=False, rot180=False, intensity=False)(sample)
    vol = sample["oct"].astype(np.float64)
    mean = vol.mean(axis=(1, 2), keepdims=True)
    std = vol.std(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(out["oct"][0], (vol - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["faf"][0], sample["faf"] / np.float32(255))
    np.testing.assert_array_equal(out["ga"][0], sample["ga"].astype(np.float32))
    assert out["oct"].dtype == out["faf"].dtype == out["ga"].dtype == np.float32
    assert set(np.unique(out["ga"])) <= {0.0, 1.0}


def test_blank_bscans_zscore_to_zero_without_nan():
    vol = np.random.default_rng(0).integers(0, 256, (3, 5, 7)).astype(np.uint8)
    vol[0] = 0
    vol[1] = 255
    z = zscore_bscans(vol)
    assert np.isfinite(z).all()
    assert (z[0] == 0).all() and (z[1] == 0).all()
    assert abs(z[2].mean()) < 1e-5 and abs(z[2].std() - 1) < 1e-4
    out = TrainTransform(crop=(3, 7), targets=(), intensity=True)({"id": "blank", "oct": vol, "meta": {}})
    assert np.isfinite(out["oct"]).all()


def test_intensity_is_per_volume_offset_contrast_shift():
    means, stds = [], []
    for draw in range(200):
        sample = _sample(sid=f"v{draw}", seed=draw)
        sample["meta"]["draw"] = draw
        out = TrainTransform(crop=None, targets=(), flips=False, rot180=False, seed=1)(sample)
        per_bscan_std = out["oct"][0].std(axis=(1, 2))
        # one contrast factor per volume, within U(0.9, 1.1)
        assert np.ptp(per_bscan_std) < 1e-4
        assert 0.9 - 1e-4 <= per_bscan_std[0] <= 1.1 + 1e-4
        means.append(out["oct"].mean())
        stds.append(per_bscan_std[0])
    means = np.array(means)
    # mean = offset * contrast + shift: offset N(0, 0.2), shift U(-0.2, 0.2) -> sd ~ sqrt(0.04 + 0.0133)
    assert abs(means.mean()) < 0.06
    assert 0.17 < means.std() < 0.30
    assert np.ptp(stds) > 0.1


def test_augmentation_is_reproducible_per_seed_epoch_draw_and_id():
    transform = TrainTransform(crop=(4, 8), targets=("faf",), seed=7)
    first = transform(_sample())
    again = transform(_sample())
    np.testing.assert_array_equal(first["oct"], again["oct"])
    np.testing.assert_array_equal(first["faf"], again["faf"])
    other = [transform(_sample(**{"epoch": e}))["meta"]["crop"] for e in range(1, 9)]
    assert any(c != first["meta"]["crop"] for c in other)


def test_volume_smaller_than_crop_names_the_sample():
    with pytest.raises(SampleError, match="p0-OD-v0.*smaller than the crop"):
        TrainTransform(crop=(32, 8))(_sample())


def test_eval_resizes_to_multiples_of_16_and_keeps_originals():
    sample = _sample(nb=49, d=10, w=500)
    out = EvalTransform(multiple=16, targets=("faf", "ga"))(sample)
    assert out["oct"].shape == (1, 48, 10, 496)
    assert out["faf"].shape == out["ga"].shape == (1, 48, 496)
    assert set(np.unique(out["ga"])) <= {0.0, 1.0}
    assert 0.0 <= out["faf"].min() and out["faf"].max() <= 1.0
    meta = out["meta"]
    assert meta["orig_shape"] == (49, 10, 500)
    np.testing.assert_array_equal(meta["orig_masks"]["ga"], sample["ga"])
    assert meta["orig_spacing_mm"] == (0.12, 0.004, 0.011)
    np.testing.assert_allclose(meta["spacing_mm"], (0.12 * 49 / 48, 0.004, 0.011 * 500 / 496))
    means = out["oct"][0].mean(axis=(1, 2))
    np.testing.assert_allclose(means, 0, atol=1e-4)


def test_eval_leaves_multiples_untouched():
    sample = _sample(nb=16, d=4, w=32)
    out = EvalTransform(targets=("faf", "ga"))(sample)
    np.testing.assert_allclose(out["oct"][0], zscore_bscans(sample["oct"]), atol=1e-6)
    np.testing.assert_array_equal(out["faf"][0], sample["faf"] / np.float32(255))
    np.testing.assert_array_equal(out["ga"][0], sample["ga"])


def test_collate_stacks_with_channel_axis():
    transform = TrainTransform(crop=(4, 8), targets=("faf", "ga"))
    batch = collate([transform(_sample(sid=f"s{i}", seed=i)) for i in range(3)])
    assert batch["oct"].shape == (3, 1, 4, 6, 8) and batch["oct"].dtype == torch.float32
    assert batch["faf"].shape == batch["ga"].shape == (3, 1, 4, 8)
    assert batch["id"] == ["s0", "s1", "s2"]
    assert batch["spacing_mm"].shape == (3, 3)
    raw = collate([_sample(sid="a"), _sample(sid="b")])
    assert raw["oct"].shape == (2, 1, 8, 6, 16) and raw["oct"].dtype == torch.uint8


def test_collate_rejects_mismatched_samples():
    a, b = _sample(sid="a"), _sample(sid="b", nb=9)
    with pytest.raises(SampleError, match="shapes differ"):
        collate([a, b])
    c = _sample(sid="c")
    del c["faf"]
    with pytest.raises(SampleError, match="absent in samples \\['c'\\]"):
        collate([a, c])
