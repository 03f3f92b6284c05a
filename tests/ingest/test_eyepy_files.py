"""eyepy .eye files (written by eyepy's EyeVolume.save) and HEYEX XML exports ingest as volumes with labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from octssl.cli import app
from octssl.corpus.store import Corpus
from octssl.ingest.phi import shifted_day
from octssl.ingest.pipeline import ingest

GRID = (8, 32, 32)


def eye_file(path: Path, patient_id: str = "PAT-SECRET-42") -> Path:
    """An EyeVolume (6 B-scans of 40 x 50, 0.1 mm apart over a 50 x 50 localizer of 12 um pixels) with a GA area
    map covering the left half of the localizer and a drusen voxel map, saved by eyepy itself."""
    from eyepy import EyeEnface, EyeVolume
    from eyepy.core.eyemeta import EyeBscanMeta, EyeEnfaceMeta, EyeVolumeMeta

    rng = np.random.default_rng(0)
    n_b, pixel = 6, 0.012
    ys = 0.06 + 0.1 * np.arange(n_b)
    meta = EyeVolumeMeta(scale_z=0.1, scale_x=pixel, scale_y=0.004, scale_unit="mm", laterality="OS",
                         visit_date="2021-03-04T10:00:00", patient={"patient_id": patient_id, "lastname": "Doe"},
                         bscan_meta=[EyeBscanMeta(start_pos=(0.0, y), end_pos=(49 * pixel, y), pos_unit="mm")
                                     for y in ys])
    localizer = EyeEnface(rng.integers(0, 255, (50, 50), dtype=np.uint8),
                          EyeEnfaceMeta(scale_x=pixel, scale_y=pixel, scale_unit="mm", laterality="OS"))
    volume = EyeVolume(rng.integers(0, 255, (n_b, 40, 50), dtype=np.uint8), meta=meta, localizer=localizer)
    area = np.zeros((50, 50), bool)
    area[:, :25] = True
    volume.localizer.add_area_annotation(area, name="GA")
    volume.add_pixel_annotation(np.zeros(volume.shape, bool), name="drusen")
    volume.volume_maps["drusen"].data[2, 20, 10:20] = True
    volume.save(path)
    return path


def test_eye_file_ingests_with_its_maps_as_labels(tmp_path: Path, key: str) -> None:
    path = eye_file(tmp_path / "scan.eye")
    report = ingest([path], tmp_path / "corpus", grid=GRID, workers=1, progress=False,
                    maps={"GA": "ga", "drusen": "rpd"})
    assert report.rejected == [] and len(report.ingested) == 1
    corpus = Corpus.open(tmp_path / "corpus")
    sample = corpus.read(report.ingested[0], localizer=True)
    assert sample["meta"]["labels"] == ["ga", "rpd"]
    assert sample["meta"]["eye"] == "OS" and sample["meta"]["acquired"] == shifted_day("2021-03-04", sample["meta"]["patient"], key.encode())
    # GA: the left half of the localizer = the first half of every B-scan's A-scans
    assert np.array_equal(sample["ga"], np.repeat((np.arange(32) < 16)[None], 8, 0).astype(np.uint8))
    # drusen: B-scan 2 of 6, A-scans 10..19 of 50 -> resized nearest onto 8 x 32
    assert sample["rpd"].any() and sample["rpd"].sum() < 20
    assert sample["localizer"].shape == (50, 50) and sample["meta"]["positions_mm"].shape == (8, 2, 2)
    manifest = (tmp_path / "corpus" / "manifest.parquet").read_bytes()
    assert b"PAT-SECRET-42" not in manifest and b"Doe" not in manifest
    assert corpus.verify() == []


def test_eye_file_without_maps_and_with_a_pixel_scale(tmp_path: Path, key: str) -> None:
    from eyepy import EyeVolume

    eye_file(tmp_path / "a.eye")
    EyeVolume(np.zeros((3, 20, 30), np.uint8)).save(tmp_path / "pixels.eye")
    (tmp_path / "fake.eye").write_bytes(b"PK\x03\x04" + b"\0" * 200)
    result = CliRunner().invoke(app, ["ingest", str(tmp_path), "--out", str(tmp_path / "c"), "--grid", "8,32,32",
                                      "--workers", "1", "--map", "GA=ga"])
    assert result.exit_code == 0, result.output
    reasons = " ".join(result.output.split())
    assert "scale unit is 'pixel'" in reasons and "not a readable eyepy .eye file" in reasons
    (row,) = Corpus.open(tmp_path / "c").rows
    assert row["labels"] == ["ga"]
    bad = CliRunner().invoke(app, ["ingest", str(tmp_path), "--out", str(tmp_path / "d"), "--map", "GA=drusen"])
    assert bad.exit_code == 2 and "expected NAME=KIND" in bad.output


def test_heyex_xml_export_ingests(tmp_path: Path, shared_dir: Path, key: str) -> None:
    folder = shared_dir / "data" / "heyex-xml" / "test_volume"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    report = ingest([folder], tmp_path / "corpus", grid=GRID, workers=1, progress=False)
    assert report.rejected == [] and len(report.ingested) == 1
    corpus = Corpus.open(tmp_path / "corpus")
    (row,) = corpus.rows
    assert row["device"] == "Heidelberg Spectralis" and row["eye"] == "OD" and row["raster"]
    assert row["localizer_grid"] == "50x50" and str(row["acquired"]) == shifted_day("2000-01-01", row["patient"], key.encode())
    manifest = (tmp_path / "corpus" / "manifest.parquet").read_bytes()
    assert b"Study-01" not in manifest and b"Doe" not in manifest
    assert corpus.verify() == []
    # an eyepy .eye written from the same export carries its area map through the XML's geometry
    from eyepy.io.he.xml_reader import HeXmlReader

    volume = HeXmlReader(folder).volume
    volume.localizer.add_area_annotation(np.ones(volume.localizer.shape, bool), name="Atrophy")
    volume.save(tmp_path / "export.eye")
    report = ingest([tmp_path / "export.eye"], tmp_path / "corpus", grid=GRID, workers=1, progress=False,
                    maps={"Atrophy": "ga"})
    assert report.rejected == []
    assert Corpus.open(tmp_path / "corpus").read(report.ingested[0])["ga"].all()


@pytest.mark.timeout(60)
def test_heyex_xml_with_a_fifo_for_a_bscan_is_rejected_without_hanging(tmp_path: Path, shared_dir: Path,
                                                                       key: str) -> None:
    """eyepy opens the images an XML names with a blocking read: a FIFO named B5.tif must be refused first."""
    import os
    import shutil

    folder = shared_dir / "data" / "heyex-xml" / "test_volume"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    export = tmp_path / "src" / "export"
    shutil.copytree(folder, export)
    (export / "B5.tif").unlink()
    os.mkfifo(export / "B5.tif")
    report = ingest([tmp_path / "src"], tmp_path / "corpus", grid=GRID, workers=1, progress=False)
    (reject,) = report.rejected
    assert "B5.tif is not a regular file (a FIFO)" in str(reject), report.rejected
    assert report.ingested == []
