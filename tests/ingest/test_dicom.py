"""DICOM ophthalmic tomography through pydicom: a file written with pydicom's own writer, read back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from octssl.corpus.store import Corpus
from octssl.ingest.dicom import OPT_SOP_CLASS
from octssl.ingest.phi import shifted_day
from octssl.ingest.pipeline import ingest

NB, D, W = 5, 96, 40


def write_dicom(path: Path, frames: np.ndarray, sop_class: str = OPT_SOP_CLASS) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "MRN-778899", "19400102"
    ds.Manufacturer, ds.ManufacturerModelName = "Acme", "OCT-1"
    ds.ImageLaterality, ds.AcquisitionDateTime = "R", "20220315093000"
    ds.Rows, ds.Columns, ds.NumberOfFrames = D, W, NB
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    measures = Dataset()
    measures.PixelSpacing = [0.0039, 0.0117]
    measures.SliceThickness = 0.12
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PixelData = frames.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_opt_volume_ingests_without_phi(tmp_path: Path, key: str) -> None:
    frames = np.random.default_rng(3).integers(0, 4096, (NB, D, W)).astype(np.uint16)
    src = tmp_path / "src"
    src.mkdir()
    write_dicom(src / "IM000001", frames)  # no extension: found by its 'DICM' preamble
    (src / "IM000002").write_bytes(b"junk")  # no extension, no magic: not a unit when walking
    report = ingest([src], tmp_path / "corpus", grid=(NB, D, W), workers=1, progress=False)
    assert report.rejected == [] and len(report.ingested) == 1
    corpus = Corpus.open(tmp_path / "corpus")
    sample = corpus.read(corpus.ids()[0])
    # 12 stored bits scaled linearly to 8 (the file has no VOI LUT); D=96 rows of 3.9 um < 1 mm: no crop
    np.testing.assert_array_equal(sample["oct"], np.rint(frames * (255 / 4095)).astype(np.uint8))
    meta = sample["meta"]
    assert meta["spacing_mm"] == pytest.approx((0.12, 0.0039, 0.0117))
    assert meta["eye"] == "OD" and meta["device"] == "Acme OCT-1" and meta["acquired"] == shifted_day("2022-03-15", meta["patient"], key.encode())
    blob = b"".join(p.read_bytes() for p in (tmp_path / "corpus").rglob("*") if p.is_file())
    blob += str(corpus.manifest.to_pylist()).encode()
    for phi in (b"MRN-778899", b"Doe", b"Jane", b"19400102", b"1940-01-02"):
        assert phi not in blob


def test_other_dicom_classes_are_rejected(tmp_path: Path, key: str) -> None:
    ct = "1.2.840.10008.5.1.4.1.1.2"
    path = write_dicom(tmp_path / "ct.dcm", np.zeros((NB, D, W), np.uint16), sop_class=ct)
    report = ingest([path], tmp_path / "corpus", workers=1, progress=False)
    ((_, reason),) = report.rejected
    assert reason.startswith("DICOM CT Image Storage is not ophthalmic tomography")
    assert pq.read_table(tmp_path / "corpus" / "rejects.parquet").num_rows == 1
