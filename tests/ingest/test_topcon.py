"""Topcon .fds: a file assembled with oct-converter's own chunk structs (no real file is available)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from octssl.corpus.store import Corpus
from octssl.ingest.phi import shifted_day
from octssl.ingest.pipeline import ingest

NB, D, W = 4, 120, 48
FUNDUS = (64, 128)  # rows, columns
BOX = (8, 10, 8 + 2 * (W - 1), 40)  # x0, y0, x1, y1 on the fundus: 2 fundus pixels per A-scan


def chunk(name: str, payload: bytes) -> bytes:
    raw = name.encode()
    return bytes([len(raw)]) + raw + struct.pack("<I", len(payload)) + payload


def write_fds(path: Path, bscans: np.ndarray, fundus_rgb: np.ndarray) -> Path:
    from oct_converter.readers.binary_structs import fds_binary as fb

    n_b, depth, width = bscans.shape
    oct_header = fb.oct_header.build(dict(scan_mode=2, width=width, height=depth, bits_per_pixel=16,
                                          number_slices=n_b, format=0, size=bscans.nbytes))
    rows, cols = fundus_rgb.shape[:2]
    fundus_header = fb.fundus_header.build(dict(width=cols, height=rows, bits_per_pixel=24, number_slices=1,
                                                format=0, size=fundus_rgb.size))
    params = fb.param_scan_04_header.build(dict(fixation=0, mirror_pos=0, polar=0, x_dimension_mm=6.0,
                                                y_dimension_mm=6.0, z_resolution_um=2.6, comp_eff_2=0.0,
                                                comp_eff_3=0.0, base_pos=0, used_calib_data=0))
    capture = fb.capture_info_02_header.build(dict(eye=1, scan_mode=2, session_id=1, label="",
                                                   cap_date=[2019, 6, 7, 8, 9, 10]))
    patient = fb.patient_info_02_header.build(dict(
        patient_id="TOPCON-PID-55", first_name="Ada", last_name="Lovelace", mid_name="", sex=2,
        birth_date=[1915, 12, 10], occup_reg=[[0] * 20] * 2, r_date=[0, 0, 0], record_id=[0] * 16,
        lv_date=[0, 0, 0], physician=[[0] * 64] * 2, zip_code=[0] * 12, addr=[[0] * 48] * 2,
        phones=[[0] * 16] * 2, nx_date=[0] * 6, multipurpose_field=[[0] * 20] * 3, descp=[0] * 64,
        reserved=[0] * 32))
    regist = fb.regist_info_header.build({"0x0": 0, "unknown": [0, 0], "bounding_box_in_fundus_pixels": list(BOX),
                                          "version": "", "bounding_box_in_trc_pixels": [0, 0, 0, 0]})
    body = b"".join([
        b"FOCTFDS" + struct.pack("<II", 1, 0),
        chunk("@IMG_SCAN_03", oct_header + bscans.astype("<u2").tobytes()),
        chunk("@IMG_OBS", fundus_header + np.ascontiguousarray(fundus_rgb[..., ::-1]).tobytes()),  # stored BGR
        chunk("@PARAM_SCAN_04", params), chunk("@CAPTURE_INFO_02", capture),
        chunk("@PATIENT_INFO_02", patient), chunk("@REGIST_INFO", regist), b"\0",
    ])
    path.write_bytes(body)
    return path


def test_fds_volume_spacing_registration_and_no_phi(tmp_path: Path, key: str) -> None:
    pytest.importorskip("oct_converter")
    rng = np.random.default_rng(5)
    bscans = rng.integers(0, 65536, (NB, D, W)).astype(np.uint16)
    yy, xx = np.mgrid[0 : FUNDUS[0], 0 : FUNDUS[1]]
    grey = (xx + yy).astype(np.uint8)
    fundus = np.stack([grey, grey, grey], axis=-1)  # equal channels: luma = the grey value
    path = write_fds(tmp_path / "scan.fds", bscans, fundus)
    report = ingest([path], tmp_path / "corpus", grid=(NB, D, W), workers=1, progress=False)
    assert report.rejected == [] and len(report.ingested) == 1
    corpus = Corpus.open(tmp_path / "corpus")
    sample = corpus.read(corpus.ids()[0])
    np.testing.assert_array_equal(sample["oct"], np.rint(bscans * (255 / 65535)).astype(np.uint8))
    meta = sample["meta"]
    assert meta["spacing_mm"] == pytest.approx((6.0 / NB, 0.0026, 6.0 / W))  # oct-converter: extent / count
    assert meta["eye"] == "OS" and meta["acquired"] == shifted_day("2019-06-07", meta["patient"], key.encode()) and meta["scan_pattern"] == "raster"
    rows = np.linspace(BOX[1], BOX[3], NB)
    expected = (BOX[0] + 2 * np.arange(W))[None, :] + rows[:, None]  # the fundus plane x + y under each A-scan
    np.testing.assert_allclose(sample["slo"], np.rint(expected), atol=1)
    full = corpus.read(corpus.ids()[0], localizer=True)  # the fundus at native size, with the registration
    np.testing.assert_array_equal(full["localizer"], grey)
    mm_per_px = 6.0 / (BOX[2] - BOX[0])  # the scan's 6 mm width over the box's fundus columns
    assert full["meta"]["localizer_spacing_mm"] == pytest.approx((mm_per_px, mm_per_px))
    starts = full["meta"]["positions_mm"][:, 0, :] / mm_per_px  # back to fundus pixels (x, y)
    np.testing.assert_allclose(starts, np.stack([np.full(NB, BOX[0]), rows], axis=1))
    blob = b"".join(p.read_bytes() for p in (tmp_path / "corpus").rglob("*") if p.is_file())
    blob += str(corpus.manifest.to_pylist()).encode()
    for phi in (b"TOPCON-PID-55", b"Ada", b"Lovelace", b"1915"):
        assert phi not in blob


def test_truncated_fds_is_rejected(tmp_path: Path, key: str) -> None:
    bscans = np.zeros((NB, D, W), np.uint16)
    whole = write_fds(tmp_path / "whole.fds", bscans, np.zeros((*FUNDUS, 3), np.uint8)).read_bytes()
    (tmp_path / "cut.fds").write_bytes(whole[: len(whole) // 2])
    report = ingest([tmp_path / "cut.fds"], tmp_path / "corpus", workers=1, progress=False)
    ((_, reason),) = report.rejected
    assert reason.startswith("truncated file (chunk @IMG_SCAN_03 needs")
