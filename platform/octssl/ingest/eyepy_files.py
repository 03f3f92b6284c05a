"""Readers for annotation tools' files, via eyepy: ``.eye`` (eyepy's ``EyeVolume.save``, what the eyelab
annotation tool writes) and Heidelberg HEYEX XML exports (``HeXmlReader``: XML + B-scan and localizer TIFFs).

Geometry: eyepy keeps each B-scan's start/end on the localizer in ``pos_unit`` (mm for Heidelberg imports)
and the localizer's pixel size in ``scale_x/scale_y`` of the same unit, localizer pixel = position / scale
(eyepy's own plotting does the same), so ``positions_mm`` and ``localizer_spacing_mm`` carry over; a
localizer in degrees (E2E imports) is converted with Heyex's standard eye (289.6 um/degree, origin at the
field's centre, 30 degrees wide). Volumes without a physical scale (``scale_unit`` 'pixel') are rejected:
the corpus needs mm.

Labels: a ``.eye`` file's en-face area maps (on the localizer's pixel grid) and voxel maps (projected over
depth onto the volume's en-face grid) become ``ga``/``rpd`` masks when ``maps`` names them
({map name: kind}); maps not named are ignored. The patient's name, birth date and ids in the file are read
only to form the pseudonym (``device_patient_id``), never stored.
"""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import ParseError

import numpy as np

from octssl.errors import IngestError
from octssl.ingest.detect import _kind
from octssl.ingest.heidelberg import DEVICE as HEIDELBERG
from octssl.ingest.heidelberg import UM_PER_DEG, display_uint8
from octssl.ingest.scan import LINE, RASTER, Scan, day, normalise_laterality

DEVICE = "eyepy EyeVolume"
MM_PER = {"mm": 1.0, "µm": 1e-3, "um": 1e-3}
LOCALIZER_FIELD_DEG = 30.0


def read_eye(path: Path, maps: dict[str, str]) -> list[Scan]:
    """An eyepy ``.eye`` file as one Scan, with the area/voxel maps named in ``maps`` as label masks."""

    from eyepy import EyeVolume

    try:
        volume = EyeVolume.load(path)
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as err:
        raise IngestError(f"{path}: not a readable eyepy .eye file ({type(err).__name__}: {err})") from err
    scan = _scan(volume, path, DEVICE)
    enface_shape = (volume.shape[0], volume.shape[2])
    area = volume.localizer.area_maps
    voxel = volume.volume_maps
    localizer_shape = None if scan.localizer is None else scan.localizer.shape
    for name, kind in maps.items():
        if name in area:
            data = np.asarray(area[name].data)
            if data.shape != localizer_shape:
                raise IngestError(f"{path}: area map {name!r} is {data.shape}, the localizer {localizer_shape}")
            scan.localizer_masks[kind] = (data > 0).astype(np.uint8)
        elif name in voxel:
            projected = np.asarray(voxel[name].data).any(axis=1)  # (nB, D, W) -> (nB, W)
            if projected.shape != enface_shape:
                raise IngestError(f"{path}: voxel map {name!r} projects to {projected.shape}, the volume is {enface_shape}")
            scan.enface_masks[kind] = projected.astype(np.uint8)
    return [scan]


def read_heyex_xml(path: Path) -> list[Scan]:
    """A HEYEX XML export (the XML file, its TIFFs beside it) as one Scan."""

    from eyepy.io.he.xml_reader import HeXmlReader

    try:
        reader = HeXmlReader(path)
        _check_images(reader, path)
        volume = reader.volume
    except ParseError as err:
        raise IngestError(f"{path}: not well-formed XML ({err})") from err
    except FileNotFoundError as err:
        raise IngestError(f"{path}: an image the XML names is missing ({err.filename or err})") from err
    except (ValueError, AttributeError, IndexError, OSError) as err:
        raise IngestError(f"{path}: cannot read the HEYEX XML export ({type(err).__name__}: {err})") from err
    return [_scan(volume, path, HEIDELBERG)]


def _check_images(reader: Any, path: Path) -> None:
    """IngestError unless every image the XML names is a regular file in the XML's folder: eyepy opens them
    with a blocking read, so a FIFO (or a device file) named like a B-scan would hang the ingest."""


    for url in reader.xml_root[0].iterfind(".//ImageData/ExamURL"):
        name = (url.text or "").split("\\")[-1]
        image = reader.path.parent / name
        if not name or "/" in name or name in (".", ".."):
            raise IngestError(f"{path}: image name {url.text!r} is not a file in the export's folder")
        try:
            mode = os.stat(image).st_mode  # stat never blocks, whatever the file is
        except OSError as err:
            raise IngestError(f"{path}: an image the XML names is missing or unreadable ({image}: "
                              f"{err.strerror})") from err
        if not stat.S_ISREG(mode):
            raise IngestError(f"{path}: image {image} is not a regular file ({_kind(mode)}); only regular files "
                              "are read")


def _scan(volume: Any, path: Path, device: str) -> Scan:
    """The Scan of an eyepy EyeVolume (display intensities, mm geometry, pseudonymisable patient id)."""
    meta = volume.meta
    unit = str(meta.get("scale_unit", "pixel"))
    if unit not in MM_PER:
        raise IngestError(f"{path}: the volume's scale unit is {unit!r}: no physical spacing to put it on a grid "
                          "(set scale_x/y/z in mm)")
    factor = MM_PER[unit]
    n_b = volume.shape[0]
    spacing = (float(volume.scale_z) * factor, float(volume.scale_y) * factor, float(volume.scale_x) * factor)
    laterality = normalise_laterality(meta.get("laterality", ""))
    bscans = _display(volume)
    localizer, loc_spacing, positions = _registration(volume, path)
    patient = meta.get("patient") or {}
    pid = patient.get("patient_id") or patient.get("pid") if isinstance(patient, dict) else None
    return Scan(
        bscans=bscans, spacing_mm=spacing, scan_pattern=RASTER if n_b > 1 else LINE, laterality=laterality,
        device=device, acquired=day(meta.get("exam_time")) or day(meta.get("visit_date")),
        device_patient_id=None if pid in (None, "") else str(pid),
        localizer=localizer, localizer_spacing_mm=loc_spacing, positions_mm=positions,
    )


def _display(volume: Any) -> np.ndarray:
    """The B-scans as display uint8: uint8 as stored; Heidelberg linear floats through the Heyex transform;
    other floats scaled from [0, 1] or their own range."""
    raw = np.asarray(volume.raw_data)
    if raw.dtype == np.uint8:
        return np.ascontiguousarray(raw)
    if volume.meta.get("intensity_transform") == "vol":
        return display_uint8(raw)
    data = np.nan_to_num(raw.astype(np.float32))
    high = float(data.max(initial=0.0))
    scale = 255.0 if high <= 1.0 else 255.0 / high
    return np.clip(np.rint(data * scale), 0, 255).astype(np.uint8)


def _registration(volume: Any, path: Path) -> tuple[np.ndarray, tuple[float, float], np.ndarray]:
    """The localizer (uint8), its pixel size in mm (row, column) and the B-scans' start/end on it in mm."""
    enface = volume.localizer
    image = np.asarray(enface.raw_data)
    if image.ndim == 3:
        image = image[..., 0]
    if image.dtype != np.uint8:
        image = np.clip(np.rint(image.astype(np.float32) * (255.0 if image.max(initial=0) <= 1 else 1.0)), 0, 255)
    unit = str(enface.scale_unit)
    starts = np.array([b.meta["start_pos"] for b in volume], np.float64)
    ends = np.array([b.meta["end_pos"] for b in volume], np.float64)
    pos_unit = str(volume[0].meta.get("pos_unit", unit))
    if pos_unit != unit:
        raise IngestError(f"{path}: B-scan positions are in {pos_unit!r} but the localizer's scale is in {unit!r}")
    if unit == "°":
        mm = UM_PER_DEG / 1000.0
        offset = LOCALIZER_FIELD_DEG / 2.0
        return (image.astype(np.uint8), (enface.scale_y * mm, enface.scale_x * mm),
                np.stack([starts + offset, ends + offset], axis=1) * mm)
    # 'pixel' volumes have no physical scale (rejected before); mm or um here
    factor = MM_PER.get(unit, 1.0)
    return (image.astype(np.uint8), (float(enface.scale_y) * factor, float(enface.scale_x) * factor),
            np.stack([starts, ends], axis=1) * factor)
