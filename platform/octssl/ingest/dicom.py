"""DICOM ophthalmic tomography (OPT) reader via pydicom: multi-frame B-scan volumes.

Accepted SOP class: Ophthalmic Tomography Image Storage (1.2.840.10008.5.1.4.1.1.77.1.5.4). Frames are
B-scans (nB, rows = depth, columns = A-scans). Spacing: ``PixelSpacing`` (row, column) and
``SliceThickness`` / ``SpacingBetweenSlices`` from the shared functional groups (or the top level).
Intensity: the file's own VOI LUT / window is the device's display transform (applied with pydicom's
``apply_voi_lut`` when present), then the result is scaled linearly from its value range (``BitsStored``)
to 8 bits. The SLO an OPT series refers to is a separate Ophthalmic Photography instance; it is not
joined here, so DICOM scans carry no ``slo``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from octssl.errors import IngestError
from octssl.ingest.scan import LINE, RASTER, Scan, day, normalise_laterality

OPT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.5.4"


def _first(dataset, *path: str):
    """Follow ``Sequence[0]`` steps through ``path``; None when any step is missing."""
    node = dataset
    for name in path:
        node = getattr(node, name, None)
        if node is None:
            return None
        if hasattr(node, "__len__") and not isinstance(node, (str, bytes)) and name.endswith("Sequence"):
            if len(node) == 0:
                return None
            node = node[0]
    return node


def _spacing(ds) -> tuple[float, float, float]:
    measures = _first(ds, "SharedFunctionalGroupsSequence", "PixelMeasuresSequence") or ds
    pixel = getattr(measures, "PixelSpacing", None) or getattr(ds, "PixelSpacing", None) or [0.0, 0.0]
    between = (
        getattr(measures, "SpacingBetweenSlices", None)
        or getattr(measures, "SliceThickness", None)
        or getattr(ds, "SpacingBetweenSlices", None)
        or getattr(ds, "SliceThickness", None)
        or 0.0
    )
    return float(between), float(pixel[0]), float(pixel[1])


def _to_uint8(ds, frames: np.ndarray) -> np.ndarray:
    from pydicom.pixels import apply_voi_lut

    if frames.dtype == np.uint8:
        return frames
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        frames = apply_voi_lut(frames, ds)
        low, high = float(frames.min()), float(frames.max())
    else:
        low, high = 0.0, float(2 ** int(getattr(ds, "BitsStored", 16)) - 1)
    scale = 255.0 / max(high - low, 1e-6)
    return np.clip(np.rint((frames.astype(np.float32) - low) * scale), 0, 255).astype(np.uint8)


def read_dicom(path: Path) -> list[Scan]:
    """Read one OPT instance; IngestError for other DICOM classes and truncated pixel data."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    where = str(path)
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, OSError, ValueError) as err:
        raise IngestError(f"{where}: unreadable DICOM ({err})") from err
    sop = str(getattr(ds, "SOPClassUID", ""))
    if sop != OPT_SOP_CLASS:
        name = getattr(getattr(ds, "SOPClassUID", None), "name", sop) or "no SOP class"
        raise IngestError(f"{where}: DICOM {name} is not ophthalmic tomography ({OPT_SOP_CLASS})")
    try:
        pixels = ds.pixel_array
    except (ValueError, AttributeError, EOFError) as err:
        raise IngestError(f"{where}: truncated or undecodable DICOM pixel data ({err})") from err
    frames = pixels[None] if pixels.ndim == 2 else pixels
    if frames.ndim != 3:
        raise IngestError(f"{where}: expected grey B-scan frames, got pixel array shape {pixels.shape}")
    manufacturer = " ".join(
        str(getattr(ds, key, "")).strip() for key in ("Manufacturer", "ManufacturerModelName")
    ).strip()
    laterality = getattr(ds, "ImageLaterality", None) or getattr(ds, "Laterality", None) or ""
    acquired = day(getattr(ds, "AcquisitionDateTime", None)) or day(
        getattr(ds, "ContentDate", None) or getattr(ds, "StudyDate", None)
    )
    return [
        Scan(
            bscans=_to_uint8(ds, frames),
            spacing_mm=_spacing(ds),
            scan_pattern=RASTER if frames.shape[0] > 1 else LINE,
            laterality=normalise_laterality(laterality),
            device=manufacturer or "DICOM OPT",
            acquired=acquired,
            device_patient_id=str(getattr(ds, "PatientID", "") or "").strip() or None,
        )
    ]
