"""Real Spectralis .vol files: shapes, patterns, spacings, registration, PHI and rejects."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from octssl.cli import app
from octssl.corpus.store import Corpus
from octssl.ingest.heidelberg import display_uint8, read_vol
from octssl.ingest.phi import shifted_day
from octssl.ingest.pipeline import ingest
from octssl.ingest.sink import REJECTS_NAME

LINE_FILE, CIRCLE_FILE = "Willis_B_716_0.vol", "Willis_B_716_2.vol"  # see ../shared/data/heidelberg-vol/README.md


def header_fields(path: Path) -> dict:
    """Header values decoded straight from the HSF-OCT-103 byte layout (independent of eyepy)."""
    raw = path.read_bytes()[:200]
    size_x, n_bscans, size_y = struct.unpack_from("<3I", raw, 12)
    scale_x, distance, scale_y = struct.unpack_from("<3d", raw, 24)
    size_x_slo, size_y_slo = struct.unpack_from("<2I", raw, 48)
    (pattern,) = struct.unpack_from("<i", raw, 96)
    return dict(size_x=size_x, n_bscans=n_bscans, size_y=size_y, scale_x=scale_x, scale_y=scale_y,
                slo=(size_y_slo, size_x_slo), pattern=pattern)


def test_display_transform_is_the_fourth_root() -> None:
    linear = np.array([0.0, 1.0 / 16, 1.0, 0.5**4, np.finfo(np.float32).max], dtype=np.float32)
    assert display_uint8(linear).tolist() == [0, 128, 255, 128, 0]  # 255 * 0.5 = 127.5 -> 128; marker -> 0


@pytest.mark.parametrize(("name", "pattern", "code"), [(LINE_FILE, "line", 1), (CIRCLE_FILE, "circle", 2)])
def test_reader_shapes_pattern_spacing(vol_dir: Path, name: str, pattern: str, code: int) -> None:
    head = header_fields(vol_dir / name)
    assert head["pattern"] == code  # what the README says the file is
    (scan,) = read_vol(vol_dir / name)
    assert scan.bscans.shape == (1, 496, 768) and scan.bscans.dtype == np.uint8
    assert scan.localizer is not None and scan.localizer.shape == (768, 768) == head["slo"]
    assert scan.scan_pattern == pattern and not scan.raster
    assert scan.spacing_mm[1:] == pytest.approx((head["scale_y"], head["scale_x"]))
    assert scan.laterality == "OD" and scan.acquired == "2017-01-11"
    assert scan.positions_mm is not None and scan.positions_mm.shape == (1, 2, 2)


def _shadow_correlation(oct_bscan: np.ndarray, trace: np.ndarray) -> float:
    """Vessels are dark on the IR SLO and cast dark shadows below them in the B-scan (detrended corr)."""
    from scipy.ndimage import uniform_filter1d

    shadow = oct_bscan.astype(np.float64)[oct_bscan.shape[0] // 3 :].mean(axis=0)
    slo = trace.astype(np.float64)
    a, b = shadow - uniform_filter1d(shadow, 31), slo - uniform_filter1d(slo, 31)
    return float(np.corrcoef(a, b)[0, 1])


def test_real_files_ingest_with_registered_slo(tmp_path: Path, vol_dir: Path, key: str) -> None:
    report = ingest([vol_dir], tmp_path / "corpus", workers=1, progress=False)
    # walking the folder: README/LICENSE are ignored, the empty invalid.vol is rejected
    assert report.rejected == [(str(vol_dir / "invalid.vol"), "empty file (0 bytes)")]
    corpus = Corpus.open(tmp_path / "corpus")
    assert len(report.ingested) == 2 and corpus.ids(raster_only=True) == []
    by_pattern = {corpus.read(i)["meta"]["scan_pattern"]: corpus.read(i) for i in corpus.ids(raster_only=False)}
    assert set(by_pattern) == {"line", "circle"}
    for pattern, name in (("line", LINE_FILE), ("circle", CIRCLE_FILE)):
        sample, head = by_pattern[pattern], header_fields(vol_dir / name)
        assert sample["oct"].shape == (1, 496, 768) and sample["slo"].shape == (1, 768)
        assert sample["meta"]["spacing_mm"][1:] == pytest.approx((head["scale_y"], head["scale_x"]))
        assert sample["meta"]["raster"] is False and sample["meta"]["acquired"] == shifted_day("2017-01-11", sample["meta"]["patient"], key.encode())
        row = corpus.row(sample["id"])
        assert pattern in row["raster_reason"] and row["source"] == report_source(vol_dir / name)
        # registration: the SLO under each A-scan matches the vessel shadows in that A-scan
        assert _shadow_correlation(sample["oct"][0], sample["slo"][0]) > 0.15
        assert _shadow_correlation(sample["oct"][0], sample["slo"][0][::-1]) < 0.05
    assert corpus.verify() == []


def slo_and_positions(path: Path) -> tuple[np.ndarray, tuple[float, float], np.ndarray]:
    """The SLO image, its (row, column) pixel size and the first B-scan's start/end in mm, straight from the
    HSF-OCT-103 byte layout: a 2048-byte header, the SLO (uint8, row-major), then per B-scan a header
    whose StartX, StartY, EndX, EndY doubles sit at byte 16."""
    raw = path.read_bytes()
    size_x_slo, size_y_slo = struct.unpack_from("<2I", raw, 48)
    scale_x_slo, scale_y_slo = struct.unpack_from("<2d", raw, 56)
    slo = np.frombuffer(raw, np.uint8, size_x_slo * size_y_slo, 2048).reshape(size_y_slo, size_x_slo)
    start_x, start_y, end_x, end_y = struct.unpack_from("<4d", raw, 2048 + slo.size + 16)
    return slo, (scale_y_slo, scale_x_slo), np.array([[[start_x, start_y], [end_x, end_y]]])


def test_real_files_keep_the_native_localizer_and_registration(tmp_path: Path, vol_dir: Path, key: str) -> None:
    ingest([vol_dir / LINE_FILE, vol_dir / CIRCLE_FILE], tmp_path / "corpus", workers=1, progress=False)
    corpus = Corpus.open(tmp_path / "corpus")
    by_source = {corpus.row(i)["source"]: i for i in corpus.ids(raster_only=False)}
    for name in (LINE_FILE, CIRCLE_FILE):
        sid = by_source[report_source(vol_dir / name)]
        slo, spacing, positions = slo_and_positions(vol_dir / name)
        sample = corpus.read(sid, localizer=True, verify=True)
        assert sample["localizer"].shape == (768, 768) and sample["localizer"].dtype == np.uint8
        np.testing.assert_array_equal(sample["localizer"], slo)
        meta = sample["meta"]
        assert meta["localizer_spacing_mm"] == pytest.approx(spacing)
        assert meta["positions_mm"].shape == (1, 2, 2)  # nB of the stored volume
        np.testing.assert_allclose(meta["positions_mm"], positions)
        extent = np.array([768 * spacing[1], 768 * spacing[0]])  # x, y in mm
        assert (meta["positions_mm"] >= 0).all() and (meta["positions_mm"] <= extent).all()
        assert corpus.row(sid)["localizer_grid"] == "768x768"
        assert set(corpus.read(sid)) == {"id", "oct", "slo", "meta"}  # the training read is unchanged
    summary = corpus.summary()
    assert summary["modalities"]["localizer"] == 2 and summary["localizer_grids"] == {"768x768": 2}
    assert summary["localizers_registered"] == 2
    assert corpus.verify() == []
    shown = CliRunner().invoke(app, ["info", str(tmp_path / "corpus")], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "localizer: 2" in shown.output


def report_source(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_no_phi_reaches_the_corpus(tmp_path: Path, vol_dir: Path, key: str) -> None:
    from eyepy.io.he.vol_reader import HeVolReader

    ingest([vol_dir / LINE_FILE, vol_dir / CIRCLE_FILE], tmp_path / "corpus", workers=1, progress=False)
    phi: set[str] = set()
    for name in (LINE_FILE, CIRCLE_FILE):
        header = HeVolReader(vol_dir / name).parsed_file
        phi.add(str(header.patient_id).strip())
        dob = str(header.dob)[:10]  # 'YYYY-MM-DD'
        y, m, d = dob.split("-")
        phi |= {dob, f"{y}{m}{d}", f"{d}.{m}.{y}", f"{m}/{d}/{y}", f"{d}/{m}/{y}"}
        phi.add(Path(name).stem.split("_")[0])  # Heyex names exports after the patient
    phi.discard("")
    assert "01234" in phi and "1951-10-03" in phi  # the header values this test guards
    texts = []
    for file in (tmp_path / "corpus").rglob("*"):
        if file.is_file():
            texts.append((file, file.read_bytes()))
            if file.suffix == ".parquet":  # decoded too: Parquet pages may be compressed
                texts.append((file, str(pq.read_table(file).to_pylist()).encode()))
    assert len(texts) > 3
    leaks = [(str(f), s) for f, data in texts for s in phi if s.encode() in data]
    assert leaks == []


def test_bad_files_rejected_good_files_land_and_reingest_is_noop(
    tmp_path: Path, mixed_sources: Path, key: str
) -> None:
    out = tmp_path / "corpus"
    report = ingest([mixed_sources], out, workers=1, progress=False, batch_size=1)
    reasons = {Path(p).name: r for p, r in report.rejected}
    assert set(reasons) == {"invalid.vol", "truncated.vol", "random.vol"}
    assert reasons["invalid.vol"] == "empty file (0 bytes)"
    assert reasons["truncated.vol"].startswith("truncated file (while reading bscans")
    assert reasons["random.vol"].startswith("not a recognised format although named .vol")
    assert len(report.ingested) == 2
    rejects = pq.read_table(out / REJECTS_NAME).to_pylist()
    assert {Path(r["path"]).name: r["reason"] for r in rejects} == reasons
    assert all(len(r["sha256"]) == 64 and r["time"] is not None for r in rejects)

    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and ".lock" not in p.name}
    again = ingest([mixed_sources], out, workers=1, progress=False)
    assert again.ingested == [] and sorted(Path(p).name for p in again.skipped) == sorted([LINE_FILE, CIRCLE_FILE])
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and ".lock" not in p.name}
    assert after == before  # manifest, arrays and rejects byte-identical: a no-op
