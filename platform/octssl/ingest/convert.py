"""One ingest unit -> corpus-ready records: read, pseudonymise, register the localizer, put on the grid.

``convert_unit`` is what runs in a worker (process or Ray task). Its result holds either records or the
reason the unit was rejected; it never raises for a bad file, so one broken file cannot stop an ingest.
A record is the INTERFACES sample dict (``id``, ``oct``, optional ``slo``, ``meta``) plus, kept apart
because the sample format has no key for it, the localizer at native resolution with its registration to
the stored B-scans (``positions_mm``, moved onto the grid for raster volumes).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from octssl.errors import IngestError, OctsslError
from octssl.ingest import detect
from octssl.ingest.dicom import read_dicom
from octssl.ingest.eyepy_files import read_eye, read_heyex_xml
from octssl.ingest.grid import (
    DEPTH_WINDOW_MM,
    enface_from_localizer,
    grid_positions,
    localizer_trace,
    resize_mask,
    to_grid,
)
from octssl.ingest.heidelberg import read_e2e, read_vol
from octssl.ingest.phi import pseudonym, shifted_day, visit_pseudonym
from octssl.ingest.registration import registration_problem
from octssl.ingest.scan import NOT_RASTER_REASON, Scan
from octssl.ingest.stack import read_stack
from octssl.ingest.topcon import read_topcon
from octssl.sample import validate_sample

ID_PREFIX = {
    detect.VOL: "vol", detect.E2E: "e2e", detect.FDS: "fds", detect.FDA: "fda", detect.DICOM: "dcm",
    detect.STACK: "stack", detect.EYE: "eye", detect.HEYEX_XML: "hxml",
}


@dataclass
class Record:
    """One volume for the corpus: the sample dict, its native-resolution localizer (if any) and the
    registration of the sample's B-scans on it (``(nB, 2, 2)`` mm, nB of the stored ``oct``)."""

    sample: dict[str, Any]
    localizer: np.ndarray | None = None
    localizer_spacing_mm: tuple[float, float] | None = None
    positions_mm: np.ndarray | None = None
    path: str = ""  # the device file (or stack folder) it came from: what a reject must name


@dataclass
class UnitResult:
    """What a worker returns for one unit: records, or a reject reason (never both)."""

    path: str
    sha256: str
    records: list[Record] = field(default_factory=list)
    reason: str | None = None
    nbytes: int = 0


def read_scans(path: Path, fmt: str, maps: dict[str, str] | None = None) -> list[Scan]:
    """Dispatch to the reader of ``fmt``; ``maps`` names
    the annotation maps an eyepy ``.eye`` file's labels come from."""
    if fmt == detect.VOL:
        return read_vol(path)
    if fmt == detect.E2E:
        return read_e2e(path)
    if fmt in (detect.FDS, detect.FDA):
        return read_topcon(path)
    if fmt == detect.DICOM:
        return read_dicom(path)
    if fmt == detect.STACK:
        return read_stack(path)
    if fmt == detect.EYE:
        return read_eye(path, maps or {})
    if fmt == detect.HEYEX_XML:
        return read_heyex_xml(path)
    raise IngestError(f"{path}: no reader for format {fmt!r}")


def to_record(
    scan: Scan, *, sample_id: str, source: str, key: bytes, grid: tuple[int, int, int], depth_mm: float,
    keep_dates: bool = False,
) -> Record:
    """Pseudonymise, register and (raster only) grid one scan. The device patient id stops here, and so does
    the real acquisition date unless ``keep_dates`` (it is shifted by the patient's keyed offset)."""
    where = f"sample {sample_id}"
    n_b, _, width = scan.bscans.shape
    if scan.raster and n_b < 2:
        raise IngestError(f"{where}: a raster volume needs at least 2 B-scans, got {n_b}")
    if scan.laterality not in ("OD", "OS"):
        raise IngestError(f"{where}: laterality unknown (neither OD nor OS)")
    trace = None
    if scan.localizer is not None and scan.positions_mm is not None and scan.localizer_spacing_mm is not None:
        trace = localizer_trace(
            scan.localizer, scan.localizer_spacing_mm, scan.positions_mm, width, scan.scan_pattern, scan.laterality
        )
    if scan.raster:
        if not all(s > 0 for s in scan.spacing_mm):
            raise IngestError(f"{where}: spacing unknown (spacing_mm {scan.spacing_mm}); cannot grid the volume")
        volume, slo, spacing = to_grid(scan.bscans, trace, scan.spacing_mm, grid, depth_mm)
        positions = None if scan.positions_mm is None else grid_positions(
            scan.positions_mm, (n_b, width), (grid[0], grid[2])
        )
    else:  # line / circle / radial: native size, their own bucket
        volume = scan.bscans
        # B-scans of these patterns are not parallel planes: the nB spacing is nominal (the A-scan pitch),
        # kept positive so that every sample has 3 usable spacings; the geometry is in positions_mm.
        spacing = (scan.spacing_mm[2], scan.spacing_mm[1], scan.spacing_mm[2])
        slo = None if trace is None else np.clip(np.rint(trace), 0, 255).astype(np.uint8)
        positions = scan.positions_mm
    problem = registration_problem(scan.localizer, scan.localizer_spacing_mm, scan.positions_mm,
                                   scan.scan_pattern, slo)
    if problem:
        slo = None  # an SLO sampled through a registration that cannot be right is not stored
    acquired = real_day(scan.acquired, where)
    patient = pseudonym(scan.device_patient_id or f"source:{source}", key)
    meta = {
        "patient": patient,
        "eye": scan.laterality,
        "visit": visit_pseudonym(patient, acquired, key),
        "device": scan.device,
        "scan_pattern": scan.scan_pattern,
        "spacing_mm": [float(v) for v in spacing],
        "raster": scan.raster,
        "source": source,
        "acquired": acquired if keep_dates else shifted_day(acquired, patient, key),
        "raster_reason": None if scan.raster else NOT_RASTER_REASON[scan.scan_pattern],
        "registration_problem": problem,
        "native_shape": [int(n) for n in scan.bscans.shape],  # (nB, D, W) as the device recorded it
    }
    sample: dict[str, Any] = {"id": sample_id, "oct": np.ascontiguousarray(volume, dtype=np.uint8), "meta": meta}
    if slo is not None:
        sample["slo"] = np.ascontiguousarray(slo, dtype=np.uint8)
    sample.update(_labels(scan, positions, volume.shape))
    validate_sample(sample, where="ingest")
    if scan.localizer is None:
        return Record(sample=sample)
    return Record(sample=sample, localizer=scan.localizer, localizer_spacing_mm=scan.localizer_spacing_mm,
                  positions_mm=positions)


def real_day(day: str | None, where: str) -> str | None:
    """``day`` ('YYYY-MM-DD' or None) when it is a date that exists; IngestError otherwise."""
    if day is None:
        return None
    try:
        return dt.date.fromisoformat(day).isoformat()
    except (TypeError, ValueError):
        raise IngestError(f"{where}: acquisition date {day!r} is not a real date") from None


def _labels(scan: Scan, positions: np.ndarray | None, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The scan's annotation masks on the stored ``(nB, W)`` grid: localizer-space masks sampled through the
    registration (as ``slo``), native en-face masks resized nearest-neighbour."""
    labels = {kind: resize_mask(mask, (shape[0], shape[2])) for kind, mask in scan.enface_masks.items()}
    for kind, mask in scan.localizer_masks.items():
        if positions is None or scan.localizer_spacing_mm is None:
            raise IngestError(f"label '{kind}' lies on the localizer, but the scan's registration is unknown")
        labels[kind] = enface_from_localizer(mask, scan.localizer_spacing_mm, positions, shape[2],
                                             scan.scan_pattern, scan.laterality, mask=True)
    return labels


def convert_unit(
    path: str,
    sha256: str,
    key: bytes,
    grid: tuple[int, int, int],
    depth_mm: float = DEPTH_WINDOW_MM,
    maps: dict[str, str] | None = None,
    keep_dates: bool = False,
) -> UnitResult:
    """Read and convert one unit; any failure becomes ``reason`` (the message without the path prefix)."""
    unit = Path(path)
    result = UnitResult(path=path, sha256=sha256)
    try:
        result.nbytes = sum(p.stat().st_size for p in unit.iterdir()) if unit.is_dir() else unit.stat().st_size
        fmt = detect.detect_format(unit)
        scans = read_scans(unit, fmt, maps)
        prefix = ID_PREFIX[fmt]
        result.records = [
            to_record(scan, sample_id=f"{prefix}-{sha256[:16]}-{scan.series}", source=sha256, key=key,
                      grid=grid, depth_mm=depth_mm, keep_dates=keep_dates)
            for scan in scans
        ]
    except OctsslError as err:
        result.reason = strip_path(str(err), path)
    except Exception as err:  # noqa: BLE001 - a reader bug on one odd file must not stop the ingest
        result.reason = f"reader failed ({type(err).__name__}: {' '.join(str(err).split())[:300]})"
    if result.reason is not None:
        result.records = []
    return result


def strip_path(message: str, path: str) -> str:
    """The reason without the unit's path (kept: a file inside a stack folder, named relative to it)."""
    if message.startswith(path + ": "):
        return message[len(path) + 2 :]
    return message[len(path) + 1 :] if message.startswith(path + "/") else message
