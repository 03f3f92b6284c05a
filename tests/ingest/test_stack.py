"""Generic raster B-scan stacks: gridding, depth window, SLO registration, and a training sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from octssl.corpus.store import Corpus
from octssl.ingest.phi import shifted_day, visit_pseudonym
from octssl.ingest.pipeline import ingest
from octssl.ingest.stack import write_stack

NB, D, W = 6, 400, 64
DEPTH_UM = 5.0  # 400 rows of 5 um: 2 mm, so the default 1 mm window keeps 200 rows
BAND = (250, 290)  # the bright "retina" rows
LOC_ROWS, LOC_COLS = 80, 100
LOC_SPACING = (0.01, 0.02)  # mm per localizer row, column
ROWS = np.array([5, 17, 29, 41, 53, 65])  # localizer row of each B-scan
COL0 = 10  # first A-scan's localizer column; A-scan j sits on column COL0 + j


def plane() -> np.ndarray:
    """The localizer: a plane (column + 2 x row), so bilinear sampling of it is exact."""
    yy, xx = np.mgrid[0:LOC_ROWS, 0:LOC_COLS]
    return (xx + 2 * yy).astype(np.uint8)


def sidecar_positions() -> np.ndarray:
    """B-scan i runs along localizer row ROWS[i] from column COL0 to COL0 + W - 1, in mm [[x, y], [x, y]]."""
    return np.array([
        [[COL0 * LOC_SPACING[1], r * LOC_SPACING[0]], [(COL0 + W - 1) * LOC_SPACING[1], r * LOC_SPACING[0]]]
        for r in ROWS
    ])


def make_stack(folder: Path, patient: str = "PAT-STACK-7") -> Path:
    rng = np.random.default_rng(1)
    bscans = rng.integers(0, 30, (NB, D, W), dtype=np.uint8)
    bscans[:, BAND[0] : BAND[1], :] = 200
    localizer = plane()
    positions = sidecar_positions().tolist()
    sidecar = {
        "spacing_mm": [0.12, DEPTH_UM / 1000, 0.02],
        "laterality": "OS",
        "device": "test stack",
        "acquired": "2021-03-04T10:11:12",
        "patient_id": patient,
        "localizer_spacing_mm": list(LOC_SPACING),
        "positions_mm": positions,
    }
    return write_stack(folder, bscans, sidecar, localizer=localizer)


def test_raster_stack_lands_on_the_grid_with_registered_slo(tmp_path: Path, key: str) -> None:
    make_stack(tmp_path / "src" / "stack_a")
    grid = (NB, 200, W)  # keep nB and W: the en-face SLO can then be checked pixel by pixel
    report = ingest([tmp_path / "src"], tmp_path / "corpus", grid=grid, workers=1, progress=False)
    assert report.rejected == [] and len(report.ingested) == 1
    corpus = Corpus.open(tmp_path / "corpus")
    (sid,) = corpus.ids(raster_only=True)
    sample = corpus.read(sid)
    assert sample["oct"].shape == grid and sample["slo"].shape == (NB, W)
    expected_slo = (COL0 + np.arange(W))[None, :] + 2 * ROWS[:, None]
    np.testing.assert_array_equal(sample["slo"], expected_slo)
    # depth: the 1 mm window (200 rows) is centred on the bright band (rows 250..289, centre 269.5)
    profile = sample["oct"].mean(axis=(0, 2))
    bright = np.flatnonzero(profile > 100)
    assert bright.min() == BAND[0] - 170 and bright.max() == BAND[1] - 1 - 170
    meta = sample["meta"]
    assert meta["spacing_mm"] == pytest.approx((0.12, DEPTH_UM / 1000, 0.02))
    assert meta["eye"] == "OS" and meta["acquired"] == shifted_day("2021-03-04", meta["patient"], key.encode())
    assert meta["visit"] == visit_pseudonym(meta["patient"], "2021-03-04", key.encode())  # not the date
    assert meta["raster"] is True and meta["scan_pattern"] == "raster"
    assert "PAT-STACK-7" not in str(corpus.manifest.to_pylist())
    # the native localizer and, on an unchanged (nB, W) grid, the sidecar's registration as given
    full = corpus.read(sid, localizer=True)
    np.testing.assert_array_equal(full["localizer"], plane())
    assert full["meta"]["localizer_spacing_mm"] == pytest.approx(LOC_SPACING)
    np.testing.assert_allclose(full["meta"]["positions_mm"], sidecar_positions())


def test_resampled_grid_and_training_sample(tmp_path: Path, key: str) -> None:
    from octssl.data.transforms import TrainTransform, collate

    make_stack(tmp_path / "stack")
    grid = (12, 64, 32)
    ingest([tmp_path / "stack"], tmp_path / "corpus", grid=grid, workers=1, progress=False)
    corpus = Corpus.open(tmp_path / "corpus")
    (sid,) = corpus.ids(raster_only=True, require=("oct", "slo"))
    sample = corpus.read(sid)
    assert sample["oct"].shape == grid and sample["slo"].shape == (12, 32)
    # spacing follows the resize: 6 -> 12 B-scans over the same extent, 200 rows -> 64, 64 A-scans -> 32
    assert sample["meta"]["spacing_mm"] == pytest.approx((0.12 * 5 / 11, 1.0 / 64, 0.04))
    # the SLO plane rises by 2 per localizer row and 1 per column: still monotone after resampling
    slo = sample["slo"].astype(int)
    assert (np.diff(slo[:, 5:-5], axis=1) > 0).all() and (np.diff(slo[:, 16]) > 0).all()
    # the stored registration follows the resize: the plane sampled along each stored B-scan's segment gives
    # the stored SLO, up to uint8 rounding (B-scan-centre mapping: 6 -> 12 B-scans, 64 -> 32 A-scans)
    positions = corpus.read(sid, localizer=True)["meta"]["positions_mm"]
    assert positions.shape == (12, 2, 2)
    along = np.linspace(0.0, 1.0, 32)[None, :, None]
    points = positions[:, None, 0, :] + (positions[:, None, 1, :] - positions[:, None, 0, :]) * along  # (12, 32, 2)
    expected = points[..., 0] / LOC_SPACING[1] + 2 * points[..., 1] / LOC_SPACING[0]
    np.testing.assert_allclose(slo, expected, atol=0.6)
    # B-scans stay within the native ones (rows 5..65) and A-scans within columns 10..73
    assert positions[:, :, 1].min() >= ROWS[0] * LOC_SPACING[0] - 1e-9
    assert positions[:, :, 1].max() <= ROWS[-1] * LOC_SPACING[0] + 1e-9
    train = TrainTransform(crop=(8, 16), targets=("slo",), seed=0)
    batch = collate([train(sample)])
    assert tuple(batch["oct"].shape) == (1, 1, 8, 64, 16) and tuple(batch["slo"].shape) == (1, 1, 8, 16)


def test_stack_sidecar_errors_are_rejects(tmp_path: Path, key: str) -> None:
    folder = make_stack(tmp_path / "src" / "bad")
    sidecar = folder / "stack.json"
    sidecar.write_text(sidecar.read_text().replace('"laterality"', '"side"'))
    report = ingest([tmp_path / "src"], tmp_path / "corpus", workers=1, progress=False)
    assert report.ingested == []
    ((path, reason),) = report.rejected
    assert Path(path) == folder.resolve() and reason == "stack.json: sidecar lacks required key 'laterality'"
