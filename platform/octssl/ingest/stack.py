"""Generic B-scan stack reader: a folder of PNG/BMP/TIFF B-scans plus one JSON sidecar.

Sidecar keys (``spacing_mm`` and ``laterality`` required)::

    {"spacing_mm": [0.12, 0.0039, 0.0117],     # nB, D, W axes in mm
     "laterality": "OD",                       # or "OS"
     "scan_pattern": "raster",                 # raster | line | circle | radial (default: raster if >1 image)
     "device": "Vendor Model",                 # default "generic B-scan stack"
     "acquired": "2021-03-04",                 # kept at day precision
     "patient_id": "...",                      # pseudonymised; default: one patient per stack
     "bscans": ["b000.png", ...],              # order; default: natural sort of the image files
     "localizer": "slo.png",                   # optional SLO / fundus image in the folder
     "localizer_spacing_mm": [0.0117, 0.0117], # row, column pixel size of the localizer
     "positions_mm": [[[x0, y0], [x1, y1]], ...]}  # per B-scan start/end on the localizer

Images are read with Pillow as greyscale; 8-bit images are taken as display intensities, 16-bit ones are
scaled linearly from 16 bits to 8. Without ``positions_mm`` a raster stack with a localizer is assumed to
cover the whole localizer, B-scan 0 at the top row and A-scans left to right.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from octssl.errors import IngestError
from octssl.ingest.detect import IMAGE_SUFFIXES, open_regular, stack_sidecar
from octssl.ingest.scan import LINE, RASTER, SCAN_PATTERNS, Scan, day, normalise_laterality

DEVICE = "generic B-scan stack"


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _image(path: Path) -> np.ndarray:
    try:
        with open_regular(path) as (handle, _), Image.open(handle) as image:
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image, dtype=np.float32) * (255.0 / 65535.0)
                return np.clip(np.rint(array), 0, 255).astype(np.uint8)
            return np.asarray(image.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise IngestError(f"{path}: unreadable image ({err})") from err


def read_stack(folder: Path) -> list[Scan]:
    """Read a stack folder (see the module docstring for the sidecar)."""
    sidecar_path = stack_sidecar(folder)
    try:
        with open_regular(sidecar_path) as (handle, size):
            sidecar = json.loads(handle.read(size).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IngestError(f"{sidecar_path}: invalid JSON sidecar ({err})") from err
    for key in ("spacing_mm", "laterality"):
        if key not in sidecar:
            raise IngestError(f"{sidecar_path}: sidecar lacks required key '{key}'")
    localizer_name = sidecar.get("localizer")
    if "bscans" in sidecar:
        names = list(sidecar["bscans"])
    else:
        names = sorted(
            (p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.name != localizer_name),
            key=_natural,
        )
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise IngestError(f"{folder}: B-scan images named in the sidecar are missing: {missing[:3]}")
    bscans = [_image(folder / name) for name in names]
    shapes = {b.shape for b in bscans}
    if len(shapes) != 1:
        raise IngestError(f"{folder}: B-scans differ in size {sorted(shapes)}")
    volume = np.stack(bscans)
    pattern = str(sidecar.get("scan_pattern", RASTER if len(bscans) > 1 else LINE))
    if pattern not in SCAN_PATTERNS:
        raise IngestError(f"{sidecar_path}: unsupported scan pattern '{pattern}' (known: {SCAN_PATTERNS})")
    laterality = normalise_laterality(sidecar["laterality"])
    if not laterality:
        raise IngestError(f"{sidecar_path}: laterality must be OD or OS, got {sidecar['laterality']!r}")
    values = [float(v) for v in sidecar["spacing_mm"]]
    if len(values) != 3:
        raise IngestError(f"{sidecar_path}: spacing_mm needs 3 values (nB, D, W), got {len(values)}")
    spacing = (values[0], values[1], values[2])
    localizer, loc_spacing, positions = None, None, None
    if localizer_name:
        localizer = _image(folder / localizer_name)
        row_mm, col_mm = (float(v) for v in sidecar.get("localizer_spacing_mm", (1.0, 1.0)))
        loc_spacing = (row_mm, col_mm)
        if "positions_mm" in sidecar:
            positions = np.asarray(sidecar["positions_mm"], dtype=np.float64)
            if positions.shape != (len(bscans), 2, 2):
                raise IngestError(
                    f"{sidecar_path}: positions_mm must be (nB, 2, 2) = ({len(bscans)}, 2, 2), "
                    f"got {positions.shape}"
                )
        else:
            positions = _covering(localizer.shape, loc_spacing, len(bscans))
    patient = sidecar.get("patient_id")
    return [
        Scan(
            bscans=volume,
            spacing_mm=spacing,
            scan_pattern=pattern,
            laterality=laterality,
            device=str(sidecar.get("device", DEVICE)),
            acquired=day(sidecar.get("acquired")),
            device_patient_id=None if patient is None else str(patient),
            localizer=localizer,
            localizer_spacing_mm=loc_spacing,
            positions_mm=positions,
        )
    ]


def _covering(shape: tuple[int, int], spacing: tuple[float, float], n_bscans: int) -> np.ndarray:
    """Positions of B-scans spanning the whole localizer, row 0 first, in mm (pixel centres)."""
    rows = np.linspace(0, shape[0] - 1, n_bscans) if n_bscans > 1 else np.array([(shape[0] - 1) / 2])
    y = rows * spacing[0]
    x0, x1 = 0.0, (shape[1] - 1) * spacing[1]
    return np.stack([np.stack([np.full_like(y, x0), y], 1), np.stack([np.full_like(y, x1), y], 1)], 1)


def write_stack(
    folder: Path, bscans: np.ndarray, sidecar: dict, localizer: np.ndarray | None = None
) -> Path:
    """Write ``bscans`` ``(nB, D, W)`` uint8 as a stack folder (PNG per B-scan + ``stack.json``).

    ``localizer`` (uint8 image) is saved as ``localizer.png`` and named in the sidecar. Used by tests and
    benchmarks, and handy for exporting volumes from other tools.
    """

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"bscan_{i:04d}.png" for i in range(len(bscans))]
    for name, bscan in zip(names, bscans, strict=True):
        Image.fromarray(np.asarray(bscan, dtype=np.uint8)).save(folder / name)
    sidecar = {**sidecar, "bscans": names}
    if localizer is not None:
        Image.fromarray(np.asarray(localizer, dtype=np.uint8)).save(folder / "localizer.png")
        sidecar["localizer"] = "localizer.png"
    (folder / "stack.json").write_text(json.dumps(sidecar, indent=1), encoding="utf-8")
    return folder
