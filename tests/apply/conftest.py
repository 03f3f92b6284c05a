"""DICOM OPT files for the apply tests, written with pydicom's own writer as tests/ingest/test_dicom.py does,
with the study/series identity and (optionally) the frame of reference a DICOM-SEG refers to."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from octssl.ingest.dicom import OPT_SOP_CLASS

# A-scans along +x (patient left), depth posterior (+y), B-scans stepping inferior (-z): the device's own
# LPS geometry of the OPT volume written below.
ASCAN_DIR, DEPTH_DIR, BSCAN_STEP = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, -0.12)
ORIGIN = (-3.0, 10.0, 2.0)
PIXEL_SPACING = (0.0039, 0.0117)  # depth, A-scan (mm)


def write_opt(path: Path, frames: np.ndarray, *, frame_of_reference: bool = True) -> Path:
    """An OPT instance of ``frames`` (nB, D, W) uint16: identity, spacing and, when ``frame_of_reference``,
    per-frame positions and a shared orientation in a frame of reference."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    n_b, depth, width = frames.shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = OPT_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = OPT_SOP_CLASS, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "OPT", 3, 1
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Doe^Jane", "MRN-778899", "19400102", "F"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20220315", "093000", "1", "A1"
    ds.Manufacturer, ds.ManufacturerModelName = "Acme", "OCT-1"
    ds.ImageLaterality, ds.AcquisitionDateTime = "R", "20220315093000"
    ds.Rows, ds.Columns, ds.NumberOfFrames = depth, width, n_b
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    measures = Dataset()
    measures.PixelSpacing = list(PIXEL_SPACING)
    measures.SliceThickness = abs(BSCAN_STEP[2])
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    if frame_of_reference:
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = generate_uid(), ""
        orientation = Dataset()
        orientation.ImageOrientationPatient = [*ASCAN_DIR, *DEPTH_DIR]
        shared.PlaneOrientationSequence = [orientation]
        per_frame = []
        for b in range(n_b):
            position = Dataset()
            position.ImagePositionPatient = [o + b * s for o, s in zip(ORIGIN, BSCAN_STEP, strict=True)]
            item = Dataset()
            item.PlanePositionSequence = [position]
            per_frame.append(item)
        ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PixelData = frames.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def opt() -> SimpleNamespace:
    """``opt.write(folder / name, shape=(nB, D, W), frame_of_reference=True)`` writes an OPT file of random
    frames; ``opt.origin``, ``opt.ascan_dir``, ``opt.depth_dir``, ``opt.bscan_step``, ``opt.pixel_spacing``:
    the geometry it is written with."""

    def write(path: Path, shape: tuple[int, int, int] = (16, 64, 64), frame_of_reference: bool = True) -> Path:
        frames = np.random.default_rng(3).integers(0, 4096, shape).astype(np.uint16)
        return write_opt(path, frames, frame_of_reference=frame_of_reference)

    return SimpleNamespace(write=write, origin=ORIGIN, ascan_dir=ASCAN_DIR, depth_dir=DEPTH_DIR,
                           bscan_step=BSCAN_STEP, pixel_spacing=PIXEL_SPACING)
