"""The device-neutral record every reader returns: one acquisition, before gridding and pseudonymisation.

A ``Scan`` still carries the device's patient id (``device_patient_id``; None when the file has none) so
that the pipeline can turn it into a keyed pseudonym; it is never written anywhere. Everything else in it is free of identifiers.

Geometry conventions (shared by all readers):
- ``bscans``: ``(nB, D, W)`` uint8 after the device's display transform.
- ``localizer``: the SLO / fundus image at native resolution, ``(H, Wl)`` uint8, or None.
- ``positions_mm``: ``(nB, 2, 2)`` float, per B-scan ``[[start_x, start_y], [end_x, end_y]]`` in mm on the
  localizer (x to the right, y down; pixel = mm / ``localizer_spacing_mm``). For circle scans the
  "end" point is the circle's centre (Heidelberg's convention). None when the registration is unknown.
- ``spacing_mm``: ``(nB, D, W)`` axes in mm (B-scan distance, axial pixel, A-scan pixel).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Scan patterns the corpus knows; only ``raster`` volumes feed 3D-to-2D training by default.
RASTER = "raster"
LINE = "line"
CIRCLE = "circle"
RADIAL = "radial"
SCAN_PATTERNS = (RASTER, LINE, CIRCLE, RADIAL)

#: Why non-raster scans are kept out of 3D-to-2D training (shown by ``octssl info``).
NOT_RASTER_REASON = {
    LINE: "line scan: a single B-scan has no en-face grid to project onto",
    CIRCLE: "circle scan: the B-scan follows a circle, not an en-face raster grid",
    RADIAL: "radial scan: B-scans cross at the centre, not an en-face raster grid",
}


@dataclass
class Scan:
    """One acquisition as read from a device file (see the module docstring for axes and units)."""

    bscans: np.ndarray
    spacing_mm: tuple[float, float, float]
    scan_pattern: str
    laterality: str
    device: str
    acquired: str | None
    device_patient_id: str | None = field(repr=False)
    localizer: np.ndarray | None = None
    localizer_spacing_mm: tuple[float, float] | None = None
    positions_mm: np.ndarray | None = None
    series: int = 0
    notes: list[str] = field(default_factory=list)
    #: annotation masks (``ga``/``rpd`` -> 0/1): on the localizer's pixel grid, or on the native (nB, W) grid
    localizer_masks: dict[str, np.ndarray] = field(default_factory=dict)
    enface_masks: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def raster(self) -> bool:
        return self.scan_pattern == RASTER


def normalise_laterality(value: object) -> str:
    """Map a device's laterality code ('OD', 'R', 'L', 'OS', 0/1, enum names) to 'OD' / 'OS' (or '')."""
    text = str(value).strip().upper().rstrip("\x00")
    if text.endswith(("OD", ".R")) or text in ("R", "RIGHT"):
        return "OD"
    if text.endswith(("OS", ".L")) or text in ("L", "LEFT"):
        return "OS"
    return ""


def day(value: object) -> str | None:
    """An acquisition timestamp cut to day precision, ISO 'YYYY-MM-DD' (None if unknown)."""
    if value is None:
        return None
    text = value.isoformat() if hasattr(value, "isoformat") else str(value)
    text = text.strip()
    if len(text) >= 10 and text[4] == "-" and text[7] == "-":
        return text[:10]
    if len(text) >= 8 and text[:8].isdigit():  # DICOM DA 'YYYYMMDD'
        return f"{text[:4]}-{text[4:6]}-{text[6:8]}"
    return None
