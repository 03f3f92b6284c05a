"""NIfTI and DICOM-SEG outputs: written, then read back with nibabel and highdicom (geometry, labels, references)."""

from __future__ import annotations

import gzip
import io
from pathlib import Path
from types import SimpleNamespace

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest

from octssl.apply.outputs import (
    DEVICE,
    FUNDUS,
    dicom_geometry,
    dicom_seg_bytes,
    enface_geometry,
    fundus_geometry,
    nifti_files,
    read_dicom_header,
)

NB, D, W = 16, 64, 64
SPACING = [0.12, 0.0039, 0.0117]


def _prob() -> np.ndarray:
    prob = np.zeros((NB, W), np.float32)
    prob[3:7, 10:30] = 0.9
    prob[12, 50] = 0.45
    return prob


def _nifti(data: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


def test_nifti_without_registration_is_the_fundus_view_with_spacing_mm() -> None:
    prob = _prob()
    geometry = fundus_geometry({"spacing_mm": SPACING, "raster": True}, (NB, W), D)
    files = nifti_files(prob, 0.5, geometry, "ga")
    mask, probability = _nifti(files["mask.nii.gz"]), _nifti(files["prob.nii.gz"])
    assert mask.shape == (W, NB, 1) and mask.get_data_dtype() == np.uint8
    assert mask.header.get_zooms() == pytest.approx((SPACING[2], SPACING[0], D * SPACING[1]))
    np.testing.assert_array_equal(np.asarray(mask.dataobj)[:, :, 0].T, prob >= 0.5)
    np.testing.assert_array_equal(np.asarray(probability.dataobj)[:, :, 0].T, prob)
    # A-scans to the patient's left, B-scans downwards (inferior), the depth slab posterior
    assert nib.aff2axcodes(mask.affine) == ("L", "I", "P")
    assert int(mask.header["sform_code"]) == 2 and mask.header.get_xyzt_units()[0] == "mm"
    # the same prediction gives the same bytes (no timestamp in the gzip header)
    assert nifti_files(prob, 0.5, geometry, "ga") == files


def test_registration_gives_direction_and_origin() -> None:
    # B-scans acquired bottom to top, A-scans right to left on the localizer, starting at (5 mm, 4 mm)
    starts = np.stack([np.full(NB, 5.0), 4.0 - np.arange(NB) * SPACING[0]], axis=1)
    ends = starts - np.array([(W - 1) * SPACING[2], 0.0])
    meta = {"spacing_mm": SPACING, "raster": True, "positions_mm": np.stack([starts, ends], axis=1)}
    geometry = fundus_geometry(meta, (NB, W), D)
    image = _nifti(nifti_files(_prob(), 0.5, geometry, "ga")["mask.nii.gz"])
    assert nib.aff2axcodes(image.affine) == ("R", "S", "P")
    assert image.header.get_zooms() == pytest.approx((SPACING[2], SPACING[0], D * SPACING[1]))
    # voxel (0, 0, 0) centre: the first A-scan of the first B-scan, at mid-depth (LPS (5, D/2, -4) -> RAS)
    np.testing.assert_allclose(image.affine @ [0, 0, 0, 1], [-5.0, -D * SPACING[1] / 2, -4.0, 1.0], atol=1e-6)
    # a registration that does not fit the map's grid is not used
    assert fundus_geometry({**meta, "positions_mm": meta["positions_mm"][:4]}, (NB, W), D).bscan_step == (0, 0, -0.12)


def test_dicom_geometry_follows_the_series_and_a_resized_grid(opt: SimpleNamespace, tmp_path: Path) -> None:
    header = read_dicom_header(opt.write(tmp_path / "IM0001", (NB, D, W)))
    native = dicom_geometry(header, (NB, W))
    assert native is not None and native.frame == DEVICE
    mid_depth = np.asarray(opt.depth_dir) * opt.pixel_spacing[0] * (D - 1) / 2
    np.testing.assert_allclose(native.origin, np.asarray(opt.origin) + mid_depth, atol=1e-6)
    np.testing.assert_allclose(native.bscan_step, opt.bscan_step, atol=1e-6)
    np.testing.assert_allclose(native.ascan_step, np.asarray(opt.ascan_dir) * opt.pixel_spacing[1], atol=1e-6)
    assert native.thickness_mm == pytest.approx(D * opt.pixel_spacing[0])
    # half the B-scans and a quarter of the A-scans: steps grow, the first pixel centre moves by half a new pixel
    half = dicom_geometry(header, (NB // 2, W // 4))
    assert half is not None
    np.testing.assert_allclose(half.bscan_step, np.asarray(opt.bscan_step) * 2, atol=1e-6)
    np.testing.assert_allclose(np.asarray(half.origin) - native.origin,
                               0.5 * np.asarray(opt.bscan_step) + 1.5 * np.asarray(opt.ascan_dir) * opt.pixel_spacing[1], atol=1e-6)
    without = read_dicom_header(opt.write(tmp_path / "IM0002", (NB, D, W), frame_of_reference=False))
    assert dicom_geometry(without, (NB, W)) is None
    assert enface_geometry({"spacing_mm": SPACING}, (NB, W), D, dicom=without).frame == FUNDUS


@pytest.mark.parametrize("frame_of_reference", [True, False])
def test_dicom_seg_references_the_series_and_reads_back(opt: SimpleNamespace, tmp_path: Path,
                                                        frame_of_reference: bool) -> None:
    source = read_dicom_header(opt.write(tmp_path / "IM0001", (NB, D, W), frame_of_reference=frame_of_reference))
    prob = _prob()
    geometry = enface_geometry({"spacing_mm": SPACING}, (NB, W), D, dicom=source)
    seg = hd.seg.segread(io.BytesIO(dicom_seg_bytes(source, prob >= 0.5, geometry, "ga", 0.5)))

    # what PACS files it by, and what it refers to
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.PatientID == source.PatientID and seg.SeriesInstanceUID != source.SeriesInstanceUID
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert (seg.FrameOfReferenceUID == source.get("FrameOfReferenceUID")) is frame_of_reference
    # the segment
    description = seg.get_segment_description(1)
    assert seg.number_of_segments == 1 and description.segment_label == "Geographic atrophy"
    assert description.segmented_property_type.value == "13331008"
    assert description.algorithm_identification[0].AlgorithmName == "octssl"
    # geometry: one en-face frame, rows = B-scans at the B-scan distance, columns = A-scans
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == pytest.approx([0.12, opt.pixel_spacing[1]])
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == pytest.approx(
        [1, 0, 0, 0, 0, -1])
    # highdicom's own reading of it as a volume (slice, row, column): the en-face mask, pixel (b, w) at
    # origin + b * B-scan step + w * A-scan step
    volume = seg.get_volume(combine_segments=True)
    np.testing.assert_array_equal(volume.array[0], (prob >= 0.5).astype(volume.array.dtype))
    np.testing.assert_allclose(volume.affine[:3, 3], geometry.origin, atol=1e-6)
    np.testing.assert_allclose(volume.affine[:3, 1], geometry.bscan_step, atol=1e-6)
    np.testing.assert_allclose(volume.affine[:3, 2], geometry.ascan_step, atol=1e-6)
