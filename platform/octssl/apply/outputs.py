"""Predictions for viewers and PACS: en-face masks and probabilities as NIfTI (nibabel) and as DICOM-SEG (highdicom).

An en-face map of an OCT volume is an image of ``nB x W`` pixels: rows are B-scans (slow axis, B-scan
distance ``spacing_mm[0]`` apart), columns are A-scans (fast axis, ``spacing_mm[2]`` apart); each pixel is a
projection over the whole depth of its A-scan, so it is a slab as thick as the B-scans are deep
(``D x spacing_mm[1]``), centred at mid-depth. :class:`EnfaceGeometry` places that grid in patient
coordinates (LPS, mm, as DICOM):

- **DICOM input with a frame of reference** (per-frame ``ImagePositionPatient`` and
  ``ImageOrientationPatient``): the device's own geometry. A-scans run along the B-scans' row direction,
  B-scans step from the first frame's position to the last, depth is their column direction. The mask
  then overlays the OPT series in any viewer.
- **Any other input** (the *fundus view*): the en-face image is a coronal plane seen from the front, as the
  localizer (IR/SLO) shows the fundus: the localizer's x (to the right) is the patient's left (+L), its y
  (down) is inferior (-S), depth is posterior (+P); the origin is the localizer's top-left corner. Where the
  volume is registered to its localizer (``positions_mm``), each B-scan's start and end give the A-scan and
  B-scan directions and the first pixel's place; without a registration A-scans run left to right and
  B-scans top to bottom from the origin. Pixel sizes are always ``spacing_mm``, the ones areas are
  measured with.

NIfTI files hold the map as an ``(W, nB, 1)`` array (i = A-scan, j = B-scan, k = the depth slab) with that
geometry converted to RAS; pixel dimensions are (A-scan pitch, B-scan distance, slab thickness). A
DICOM-SEG holds the binary mask as one frame of the same geometry, in the source's frame of reference
(or a new one, in the fundus view, when the source has none), and references the source OPT instance and
series; it carries the source's patient and study identifiers, since that is how PACS files it with the
study.
"""

from __future__ import annotations

import copy
import gzip
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from octssl import __version__
from octssl.errors import PredictError
from octssl.ingest.dicom import _first

INSTALL_HINT = "pip install 'octssl[interop]'"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
DEVICE, FUNDUS = "device", "fundus"  # EnfaceGeometry.frame: DICOM patient coordinates, or the fundus view


@dataclass(frozen=True)
class EnfaceGeometry:
    """Where an en-face ``(nB, W)`` grid lies in LPS mm: pixel ``(b, w)``'s centre is
    ``origin + b * bscan_step + w * ascan_step``; ``depth_axis`` (unit) points into the eye, along which the
    slab is ``thickness_mm`` thick. ``frame``: :data:`DEVICE` or :data:`FUNDUS` (module docstring)."""

    origin: tuple[float, float, float]
    ascan_step: tuple[float, float, float]
    bscan_step: tuple[float, float, float]
    depth_axis: tuple[float, float, float]
    thickness_mm: float
    frame: str

    @property
    def pixel_spacing(self) -> tuple[float, float]:
        """DICOM PixelSpacing: (between rows = B-scan distance, between columns = A-scan pitch), mm."""
        return float(np.linalg.norm(self.bscan_step)), float(np.linalg.norm(self.ascan_step))

    @property
    def orientation(self) -> list[float]:
        """DICOM ImageOrientationPatient: the row (A-scan) direction, then the column (B-scan) direction."""
        row = np.asarray(self.ascan_step) / np.linalg.norm(self.ascan_step)
        column = np.asarray(self.bscan_step) / np.linalg.norm(self.bscan_step)
        return [float(v) for v in (*row, *column)]

    def nifti_affine(self) -> np.ndarray:
        """The 4x4 voxel-to-RAS affine of the ``(W, nB, 1)`` NIfTI array."""
        affine = np.eye(4)
        affine[:3, 0] = LPS_TO_RAS @ np.asarray(self.ascan_step)
        affine[:3, 1] = LPS_TO_RAS @ np.asarray(self.bscan_step)
        affine[:3, 2] = LPS_TO_RAS @ (np.asarray(self.depth_axis) * self.thickness_mm)
        affine[:3, 3] = LPS_TO_RAS @ np.asarray(self.origin)
        return affine


def _vector(values: np.ndarray) -> tuple[float, float, float]:
    """Plain floats (rounded to a nanometre, so -0.0 and 1e-17 noise do not reach the files)."""
    x, y, z = (float(round(v, 6)) + 0.0 for v in values)
    return x, y, z


def _unit(vector: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return fallback if norm < 1e-9 else vector / norm


def _fundus_point(xy: np.ndarray, depth_mm: float) -> np.ndarray:
    """A localizer point (x right, y down, mm) at ``depth_mm`` behind it, in the fundus view's LPS."""
    return np.array([float(xy[0]), depth_mm, -float(xy[1])])


def fundus_geometry(meta: dict[str, Any], shape: tuple[int, int], depth: int) -> EnfaceGeometry:
    """The fundus-view geometry of an en-face ``shape`` (nB, W) map of a volume ``depth`` rows deep, from its
    ``meta`` (``spacing_mm`` and, when they fit ``shape``, the raster registration ``positions_mm``)."""
    spacing = [float(v) for v in meta["spacing_mm"]]
    thickness = depth * spacing[1]
    ascan_dir, bscan_dir, start = np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, -1.0]), np.zeros(2)
    positions = meta.get("positions_mm")
    if positions is not None and meta.get("raster", True) and np.shape(positions) == (shape[0], 2, 2):
        positions = np.asarray(positions, np.float64)
        start = positions[0, 0]
        ascan_dir = _unit(_fundus_point(positions[0, 1], 0) - _fundus_point(positions[0, 0], 0), ascan_dir)
        if shape[0] > 1:
            bscan_dir = _unit(_fundus_point(positions[-1, 0], 0) - _fundus_point(positions[0, 0], 0), bscan_dir)
    return EnfaceGeometry(origin=_vector(_fundus_point(start, thickness / 2)), ascan_step=_vector(ascan_dir * spacing[2]),
                          bscan_step=_vector(bscan_dir * spacing[0]), depth_axis=(0.0, 1.0, 0.0), thickness_mm=thickness,
                          frame=FUNDUS)


def _centres(native: int, target: int) -> tuple[float, float]:
    """First output pixel centre and step, in native pixels, of a ``native -> target`` resize (pixel-area
    alignment, as :func:`octssl.ingest.grid.resize` and the predictor's bilinear resize sample)."""
    scale = native / target
    return 0.5 * scale - 0.5, scale


def dicom_geometry(ds: Any, shape: tuple[int, int]) -> EnfaceGeometry | None:
    """The device geometry of an en-face ``shape`` (nB, W) map of the OPT dataset ``ds`` (its header is
    enough), or None when ``ds`` has no frame of reference with per-frame positions and an orientation."""

    frames = list(getattr(ds, "PerFrameFunctionalGroupsSequence", []) or [])
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if "FrameOfReferenceUID" not in ds or len(frames) != n_frames:
        return None
    positions = [_first(frame, "PlanePositionSequence") for frame in frames]
    orientation = (_first(ds, "SharedFunctionalGroupsSequence", "PlaneOrientationSequence")
                   or _first(frames[0], "PlaneOrientationSequence"))
    measures = (_first(ds, "SharedFunctionalGroupsSequence", "PixelMeasuresSequence")
                or _first(frames[0], "PixelMeasuresSequence"))
    if any(p is None or "ImagePositionPatient" not in p for p in positions) or orientation is None or measures is None:
        return None
    ipp = np.array([[float(v) for v in p.ImagePositionPatient] for p in positions])
    iop = np.array([float(v) for v in orientation.ImageOrientationPatient])
    depth_spacing, ascan_spacing = (float(v) for v in measures.PixelSpacing)
    ascan_dir, depth_dir = _unit(iop[:3], np.array([1.0, 0, 0])), _unit(iop[3:], np.array([0, 1.0, 0]))
    bscan_native = (ipp[-1] - ipp[0]) / (n_frames - 1) if n_frames > 1 else np.cross(depth_dir, ascan_dir) * ascan_spacing
    thickness = int(ds.Rows) * depth_spacing
    (b0, b_scale), (w0, w_scale) = _centres(n_frames, shape[0]), _centres(int(ds.Columns), shape[1])
    origin = ipp[0] + depth_dir * depth_spacing * (int(ds.Rows) - 1) / 2 + b0 * bscan_native + w0 * ascan_dir * ascan_spacing
    return EnfaceGeometry(origin=_vector(origin), ascan_step=_vector(ascan_dir * ascan_spacing * w_scale),
                          bscan_step=_vector(bscan_native * b_scale), depth_axis=_vector(depth_dir), thickness_mm=thickness,
                          frame=DEVICE)


# ---------------------------------------------------------------- NIfTI
def nifti_bytes(enface: np.ndarray, geometry: EnfaceGeometry, description: str) -> bytes:
    """The bytes of a NIfTI-1 file (not yet gzipped) of an en-face ``(nB, W)`` map (uint8 mask or float32
    probability)."""
    import nibabel as nib

    array = np.ascontiguousarray(np.asarray(enface).T[:, :, None])
    image = nib.Nifti1Image(array, geometry.nifti_affine())
    code = "scanner" if geometry.frame == DEVICE else "aligned"
    image.set_sform(geometry.nifti_affine(), code=code)
    image.set_qform(geometry.nifti_affine(), code=code)
    image.header.set_xyzt_units(xyz="mm")
    image.header["descrip"] = description[:79].encode()
    return image.to_bytes()


def nifti_files(prob: np.ndarray, threshold: float, geometry: EnfaceGeometry, task: str) -> dict[str, bytes]:
    """``prob.nii.gz`` (float32) and ``mask.nii.gz`` (uint8 0/1) of one volume."""

    def zipped(data: bytes) -> bytes:
        return gzip.compress(data, compresslevel=6, mtime=0)  # mtime 0: the same prediction gives the same bytes

    return {"prob.nii.gz": zipped(nifti_bytes(np.asarray(prob, np.float32), geometry, f"octssl {task} probability")),
            "mask.nii.gz": zipped(nifti_bytes((np.asarray(prob) >= threshold).astype(np.uint8), geometry,
                                              f"octssl {task} mask, probability >= {threshold:g}"))}


# ---------------------------------------------------------------- DICOM-SEG
SEGMENTS = {  # task -> (label, segmented property type (scheme, value, meaning))
    "ga": ("Geographic atrophy", ("SCT", "13331008", "Atrophy")),
    "rpd": ("Reticular pseudodrusen", ("99OCTSSL", "rpd", "Reticular pseudodrusen")),  # no SNOMED CT code in pydicom
}


def read_dicom_header(path: Path) -> Any:
    """The source OPT dataset without its pixels (all a DICOM-SEG needs of it)."""
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True)


def _with_frame_of_reference(ds: Any, geometry: EnfaceGeometry) -> Any:
    """A copy of the header ``ds`` (which has no frame of reference) given a new one, with its B-scan frames
    placed in the fundus view of ``geometry`` - what highdicom needs to place a frame that is not one of the
    source's. The source file is not changed; the SEG names the new frame of reference as its own."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    header = copy.deepcopy(ds)
    header.FrameOfReferenceUID = generate_uid()
    header.PositionReferenceIndicator = ""
    depth = np.asarray(geometry.depth_axis)
    ascan = np.asarray(geometry.ascan_step) / np.linalg.norm(geometry.ascan_step)
    top = np.asarray(geometry.origin) - depth * geometry.thickness_mm / 2
    shared = header.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in header else Dataset()
    orientation = Dataset()
    orientation.ImageOrientationPatient = [float(v) for v in (*ascan, *depth)]
    shared.PlaneOrientationSequence = [orientation]
    header.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for b in range(int(getattr(header, "NumberOfFrames", 1) or 1)):
        position = Dataset()
        position.ImagePositionPatient = [float(v) for v in top + b * np.asarray(geometry.bscan_step)]
        frame = Dataset()
        frame.PlanePositionSequence = [position]
        frames.append(frame)
    header.PerFrameFunctionalGroupsSequence = frames
    return header


def require_highdicom() -> Any:
    """highdicom, or PredictError saying what to install."""
    try:
        import highdicom
    except ImportError:
        raise PredictError(f"--format dicom-seg needs highdicom, which is not installed: {INSTALL_HINT}") from None
    return highdicom


def enface_geometry(meta: dict[str, Any], shape: tuple[int, int], depth: int, dicom: Any = None) -> EnfaceGeometry:
    """The geometry of an en-face ``shape`` map: the device's when ``dicom`` (the source OPT header) has a
    frame of reference, else the fundus view (:func:`fundus_geometry`)."""
    found = None if dicom is None else dicom_geometry(dicom, shape)
    return found if found is not None else fundus_geometry(meta, shape, depth)


def dicom_seg(source: Any, mask: np.ndarray, geometry: EnfaceGeometry, task: str, threshold: float) -> Any:
    """A binary DICOM-SEG (pydicom Dataset) of the en-face ``mask`` (nB, W) of the OPT ``source`` header: one
    segment, the task's lesion, one frame placed by ``geometry`` (:func:`enface_geometry`), in the source's
    frame of reference when it is the device's, else in a new one."""
    hd = require_highdicom()
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    mask = np.asarray(mask) > 0
    header = source if geometry.frame == DEVICE else _with_frame_of_reference(source, geometry)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                    "StudyDate", "StudyTime", "ReferringPhysicianName"):  # type 2: present, may be empty
        if keyword not in header:
            header = header if header is not source else copy.deepcopy(source)
            setattr(header, keyword, "")
    label, (scheme, value, meaning) = SEGMENTS[task]
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="octssl", version=__version__, family=codes.cid7162.ArtificialIntelligence,
            parameters={"threshold": f"{threshold:g}"}),
        anatomic_regions=[codes.SCT.Retina],
    )
    row_spacing, column_spacing = geometry.pixel_spacing
    seg = hd.seg.Segmentation(
        source_images=[header], pixel_array=mask[None].astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[description],
        series_instance_uid=generate_uid(), series_number=int(getattr(source, "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="octssl", manufacturer_model_name=task,
        software_versions=__version__, device_serial_number="0",
        series_description=f"octssl {task} en-face (probability >= {threshold:g})",
        pixel_measures=hd.PixelMeasuresSequence(pixel_spacing=[row_spacing, column_spacing],
                                                slice_thickness=geometry.thickness_mm,
                                                spacing_between_slices=geometry.thickness_mm),
        plane_orientation=hd.PlaneOrientationSequence(coordinate_system="PATIENT", image_orientation=geometry.orientation),
        plane_positions=[hd.PlanePositionSequence(coordinate_system="PATIENT", image_position=list(geometry.origin))],
        omit_empty_frames=False, content_label=task.upper(), content_description=f"{label}, en-face")
    return seg


def dicom_seg_bytes(source: Any, mask: np.ndarray, geometry: EnfaceGeometry, task: str, threshold: float) -> bytes:
    """:func:`dicom_seg` as the bytes of a DICOM file."""

    buffer = io.BytesIO()
    dicom_seg(source, mask, geometry, task, threshold).save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
