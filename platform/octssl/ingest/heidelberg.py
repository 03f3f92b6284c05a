"""Heidelberg Spectralis readers: raw export ``.vol`` (HSF-OCT-1xx) and ``.e2e`` containers, via eyepy.

Intensity: Spectralis stores B-scans as float32 *linear* reflectivity in [0, 1], with the largest float32
(3.4028235e38) marking invalid / not-acquired pixels. Heidelberg's raw-export specification ("Spectralis
Special Function: Exporting Raw Data", HSF-OCT-103) says these linear values are shown on screen after a
fourth-root compression, ``display = 255 * value ** 0.25`` (the Heyex display transform, also what the
ImageJ "Open Heyex Raw Files" plugin applies). ``display_uint8`` does exactly that, invalid pixels -> 0.
(eyepy's own ``vol_intensity_transform`` uses a log mapping instead; we keep the device's.)

Registration: each B-scan header gives its start and end point on the SLO in mm (for circle scans the
end point is the circle's centre); SLO pixel = mm / SLO pixel size.
"""

from __future__ import annotations

import re
from pathlib import Path

import construct
import numpy as np

from octssl.errors import IngestError
from octssl.ingest.scan import CIRCLE, LINE, RADIAL, RASTER, Scan, day, normalise_laterality

VOL_MAGIC = b"HSF-OCT-"
E2E_MAGIC = b"CMDb"
DEVICE = "Heidelberg Spectralis"
INVALID = np.finfo(np.float32).max
#: E2E files give positions in degrees; Heyex converts with a standard eye of 289.6 um per degree.
UM_PER_DEG = 289.6
#: Heyex scan-pattern codes (vol header ``scan_pattern``, E2E B-scan meta ``scan_pattern``).
PATTERNS = {1: LINE, 2: CIRCLE, 3: RASTER, 4: RASTER, 5: RADIAL}


def display_uint8(linear: np.ndarray) -> np.ndarray:
    """Heyex display transform of linear float reflectivity: ``round(255 * x ** 0.25)``, invalid -> 0."""
    data = np.asarray(linear, dtype=np.float32)
    valid = np.isfinite(data) & (data < INVALID) & (data <= 2.0)  # E2E marks empty regions with ~2.0
    data = np.where(valid, np.clip(data, 0.0, 1.0), 0.0)
    return np.rint(255.0 * np.power(data, 0.25, dtype=np.float32)).astype(np.uint8)


def _short(err: Exception) -> str:
    """construct's parse error as one line: 'while reading bscans -> data: expected N bytes, found M'."""
    text = " ".join(str(err).split())
    found = re.search(r"\(parsing\) -> (.*?) stream read less than specified amount, (expected \d+), (found \d+)", text)
    if found:
        return f"while reading {found.group(1)}: {found.group(2)} bytes, {found.group(3)}"
    return text


def _pattern(code: int, n_bscans: int, where: str) -> str:
    if code == 0:  # "unknown" in the header: decide by the number of B-scans
        return RASTER if n_bscans > 1 else LINE
    if code not in PATTERNS:
        raise IngestError(f"{where}: unsupported scan pattern {code} (known: {sorted(PATTERNS)})")
    return PATTERNS[code]


def read_vol(path: Path) -> list[Scan]:
    """Read a ``.vol`` raw export (every scan pattern) with eyepy's ``HeVolReader``."""
    from eyepy.io.he.vol_reader import HeVolReader

    where = str(path)
    with open(path, "rb") as handle:
        if not handle.read(len(VOL_MAGIC)) == VOL_MAGIC:
            raise IngestError(f"{where}: not a Heidelberg .vol file (no 'HSF-OCT-' header)")
    try:
        parsed = HeVolReader(path).parsed_file
    except construct.StreamError as err:
        raise IngestError(f"{where}: truncated file ({_short(err)})") from err
    except (construct.ConstructError, OverflowError, ValueError) as err:  # e.g. a date field out of range
        raise IngestError(f"{where}: corrupt .vol header ({_short(err)})") from err
    n_bscans = int(parsed.n_bscans)
    if n_bscans < 1 or len(parsed.bscans) != n_bscans:
        raise IngestError(f"{where}: header announces {n_bscans} B-scans, file holds {len(parsed.bscans)}")
    pattern = _pattern(int(parsed.scan_pattern), n_bscans, where)
    bscans = np.stack([display_uint8(b.data) for b in parsed.bscans])
    positions = np.array(
        [[[b.start_x, b.start_y], [b.end_x, b.end_y]] for b in parsed.bscans], dtype=np.float64
    )
    distance = float(parsed.distance)
    if pattern == RASTER and distance <= 0 and n_bscans > 1:
        distance = float(np.linalg.norm(positions[-1, 0] - positions[0, 0]) / (n_bscans - 1))
    localizer = np.asarray(parsed.localizer, dtype=np.uint8)
    return [
        Scan(
            bscans=bscans,
            spacing_mm=(distance, float(parsed.scale_y), float(parsed.scale_x)),
            scan_pattern=pattern,
            laterality=normalise_laterality(parsed.scan_position),
            device=DEVICE,
            acquired=day(parsed.exam_time) or day(parsed.visit_date),
            device_patient_id=str(parsed.patient_id).strip() or f"pid:{int(parsed.pid)}",
            localizer=localizer if localizer.size else None,
            localizer_spacing_mm=(float(parsed.scale_y_slo), float(parsed.scale_x_slo)),
            positions_mm=positions,
        )
    ]


def read_e2e(path: Path) -> list[Scan]:
    """Read every B-scan series of a ``.e2e`` container with eyepy's ``HeE2eReader`` (one Scan each)."""
    from eyepy.io.he.e2e_reader import HeE2eReader

    where = str(path)
    try:
        reader = HeE2eReader(path)
        with reader:
            scans = [_e2e_series(series, f"{where}: series {k}", k) for k, series in enumerate(reader.series)]
    except construct.StreamError as err:
        raise IngestError(f"{where}: truncated file ({_short(err)})") from err
    except construct.ConstructError as err:
        raise IngestError(f"{where}: corrupt .e2e container ({_short(err)})") from err
    found = [s for s in scans if s is not None]
    if not found:
        raise IngestError(f"{where}: .e2e container holds no OCT B-scan series")
    return found


def _e2e_series(series, where: str, index: int) -> Scan | None:
    if series.n_bscans == 0:
        return None
    bscan_meta = series.get_bscan_meta()
    pattern = _pattern(int(bscan_meta[0]["scan_pattern"]), series.n_bscans, where)
    heyex = series.get_heyex_metadata()
    mm_per_deg = UM_PER_DEG / 1000.0
    positions = mm_per_deg * np.array(
        [[m["start_pos"], m["end_pos"]] for m in bscan_meta], dtype=np.float64
    )
    scale_x_um = series.get_x_scale_derivation()["scaling_x_um_per_pixel"] or 0.0
    n = series.n_bscans
    distance = float(np.linalg.norm(positions[-1, 0] - positions[0, 0]) / (n - 1)) if n > 1 else 0.0
    localizer, loc_spacing = None, None
    try:
        enface = series.get_localizer()
        localizer = np.asarray(enface.data, dtype=np.uint8)
        # Heyex localizers span 30 degrees; positions are in degrees on that field.
        loc_spacing = (30.0 / localizer.shape[0] * mm_per_deg, 30.0 / localizer.shape[1] * mm_per_deg)
    except (ValueError, KeyError, IndexError):
        pass
    patient = heyex.get("Patient", {})
    container = heyex.get("Container", {})
    return Scan(
        bscans=display_uint8(series.get_bscans()),
        spacing_mm=(distance, float(bscan_meta[0]["scale_y"]), scale_x_um / 1000.0),
        scan_pattern=pattern,
        laterality=normalise_laterality(series.laterality()),
        device=DEVICE,
        acquired=day(container.get("Series Date")),
        device_patient_id=str(patient.get("Patient ID") or f"e2e-patient:{series.patient.id}"),
        localizer=localizer,
        localizer_spacing_mm=loc_spacing,
        positions_mm=positions if localizer is not None else None,
        series=index,
        notes=["e2e: lateral spacing from Heyex's 289.6 um/degree standard eye"],
    )
