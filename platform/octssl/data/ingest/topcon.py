"""Topcon readers: ``.fds`` (Triton / Maestro raw) and ``.fda`` (3D OCT-1000/2000) via oct-converter.

Intensity: ``.fda`` B-scans stored as JPEG (``@IMG_JPEG``) are already the device's 8-bit display images
and are kept as they are. 16-bit B-scans (``.fds`` ``@IMG_SCAN_03``, ``.fda`` ``@IMG_MOT_COMP_03``) are
scaled linearly from their recorded bit depth to 8 bits (Topcon documents no other display curve).

Localizer: the grey IR-like ``@IMG_TRC_02`` image when present, otherwise the colour fundus converted to
luma (ITU-R 601). Registration: ``@REGIST_INFO`` gives the scan area's bounding box on the fundus
(x0, y0, x1, y1 in pixels); B-scan i runs from x0 to x1 at row y0 + i (y1 - y0) / (nB - 1). Its pixel
size follows from the scan width in mm over the box width. Without that chunk the scan keeps no
registration (no ``slo``). No real Topcon file is in the test data: this reader is exercised by format
detection only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from octssl.data.ingest.scan import LINE, RADIAL, RASTER, Scan, day, normalise_laterality
from octssl.errors import IngestError

#: Topcon ``scan_mode`` in the OCT header: 2 = 3D, 3 = radial, 4 = cross (two lines).
PATTERNS = {2: RASTER, 3: RADIAL, 4: LINE}


def _to_uint8(slices: list[np.ndarray], bits: int | None) -> np.ndarray:
    volume = np.stack([np.asarray(s) for s in slices])
    if volume.dtype == np.uint8:
        return volume
    top = float(2 ** int(bits) - 1) if bits else float(max(volume.max(), 1))
    return np.clip(np.rint(volume.astype(np.float32) * (255.0 / top)), 0, 255).astype(np.uint8)


def _grey(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3:  # oct-converter stores RGB order
        image = image[..., 0] * 0.299 + image[..., 1] * 0.587 + image[..., 2] * 0.114
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def read_topcon(path: Path) -> list[Scan]:
    """Read a Topcon ``.fds`` or ``.fda`` file (chosen by its 'FOCT' header type)."""
    from oct_converter.readers import FDA, FDS

    where = str(path)
    with open(path, "rb") as handle:
        kind = handle.read(7)[4:7]
    reader_cls = FDS if kind == b"FDS" else FDA
    try:
        reader = reader_cls(path)
        oct_volume = reader.read_oct_volume()
        meta = reader.read_all_metadata()
    except (ValueError, IndexError, KeyError, EOFError) as err:
        raise IngestError(f"{where}: truncated or unreadable Topcon file ({err})") from err
    if not oct_volume.volume:
        raise IngestError(f"{where}: no OCT B-scans in the Topcon file")
    header = oct_volume.oct_header or {}
    bscans = _to_uint8(oct_volume.volume, header.get("bits_per_pixel"))
    mode = int(header.get("scan_mode", 2))
    pattern = PATTERNS.get(mode)
    if pattern is None:
        raise IngestError(f"{where}: unsupported Topcon scan mode {mode} (known: {sorted(PATTERNS)})")
    if pattern == RASTER and bscans.shape[0] == 1:
        pattern = LINE
    spacing = oct_volume.pixel_spacing or [0.0, 0.0, 0.0]  # (W, nB, D) per oct-converter
    localizer = _localizer(reader, kind)
    positions, loc_spacing = _registration(meta, localizer, bscans.shape[0], float(spacing[0]) * bscans.shape[2])
    model = str((meta.get("hw_info_03") or meta.get("hw_info_02") or {}).get("model_name", "")).strip()
    return [
        Scan(
            bscans=bscans,
            spacing_mm=(float(spacing[1]), float(spacing[2]), float(spacing[0])),
            scan_pattern=pattern,
            laterality=normalise_laterality(oct_volume.laterality or ""),
            device=f"Topcon {model}".strip(),
            acquired=day(oct_volume.acquisition_date),
            device_patient_id=str(oct_volume.patient_id or "").strip() or None,
            localizer=localizer if positions is not None else None,
            localizer_spacing_mm=loc_spacing,
            positions_mm=positions,
        )
    ]


def _localizer(reader, kind: bytes) -> np.ndarray | None:
    try:
        if kind != b"FDS":
            grey = reader.read_fundus_image_gray_scale()
            if grey is not None:
                return _grey(grey.image)
        fundus = reader.read_fundus_image()
        return None if fundus is None else _grey(fundus.image)
    except (ValueError, KeyError, OSError):
        return None


def _registration(meta: dict, localizer: np.ndarray | None, n_bscans: int, width_mm: float):
    info = meta.get("regist_info")
    if localizer is None or not info or width_mm <= 0:
        return None, None
    x0, y0, x1, y1 = (float(v) for v in info["bounding_box_in_fundus_pixels"])
    if x1 <= x0:
        return None, None
    mm_per_px = width_mm / (x1 - x0)
    rows = np.linspace(y0, y1, n_bscans) if n_bscans > 1 else np.array([(y0 + y1) / 2])
    positions = np.stack(
        [np.stack([np.full_like(rows, x0), rows], 1), np.stack([np.full_like(rows, x1), rows], 1)], 1
    )
    return positions * mm_per_px, (mm_per_px, mm_per_px)
