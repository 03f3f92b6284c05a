"""Registration sanity: a volume whose B-scans cannot lie where the device says is flagged, not trusted.

Two checks, made at ingest on what the reader returned: every B-scan's start and end (for a circle scan,
the circle's bounding box) must lie on the localizer (within one pixel), and the en-face image sampled
through that registration must not be one constant value (what sampling outside the localizer gives). A
flagged volume keeps its OCT (pretraining on OCT alone is still sound) and its reason in the manifest
(``registration_problem``); its registered SLO is not stored, so no pretraining reconstructs it.
"""

from __future__ import annotations

import numpy as np


def positions_problem(positions_mm: np.ndarray, localizer_shape: tuple[int, int],
                      spacing_mm: tuple[float, float], scan_pattern: str) -> str | None:
    """Why the B-scan positions cannot lie on a localizer of ``localizer_shape`` (rows, columns) at
    ``spacing_mm`` (mm per row, column), or None. Positions are ``(nB, 2, 2)`` [[x, y] start, [x, y] end]."""
    width_mm, height_mm = localizer_shape[1] * spacing_mm[1], localizer_shape[0] * spacing_mm[0]
    points = np.asarray(positions_mm, float).reshape(-1, 2, 2)
    if scan_pattern == "circle":  # "end" is the centre: the circle's bounding box must be on the localizer
        radius = np.linalg.norm(points[:, 0] - points[:, 1], axis=1)[:, None]
        corners = np.concatenate([points[:, 1] - radius, points[:, 1] + radius])
    else:
        corners = points.reshape(-1, 2)
    slack = np.array([spacing_mm[1], spacing_mm[0]])  # one pixel: devices put the last A-scan on the edge
    low, high = corners.min(axis=0), corners.max(axis=0)
    if np.all(low >= -slack) and np.all(high <= np.array([width_mm, height_mm]) + slack):
        return None
    return (f"B-scan positions x {low[0]:.2f}-{high[0]:.2f} mm, y {low[1]:.2f}-{high[1]:.2f} mm lie outside the "
            f"{width_mm:.2f} x {height_mm:.2f} mm localizer")


def registration_problem(localizer: np.ndarray | None, spacing_mm: tuple[float, float] | None,
                         positions_mm: np.ndarray | None, scan_pattern: str,
                         registered: np.ndarray | None) -> str | None:
    """Every reason (joined by '; ') the registration of a scan cannot be right, or None. ``registered`` is
    the en-face image sampled through it (the SLO the corpus would store)."""
    problems = []
    if localizer is not None and int(localizer.max()) == int(localizer.min()):
        problems.append(f"the localizer is one constant value ({int(localizer.min())})")
    if localizer is not None and spacing_mm is not None and positions_mm is not None:
        problem = positions_problem(positions_mm, localizer.shape[:2], spacing_mm, scan_pattern)
        if problem:
            problems.append(problem)
    if registered is not None and registered.size and float(np.ptp(registered)) == 0.0:
        problems.append(f"the registered en-face image is one constant value ({float(registered.flat[0]):g})")
    return "; ".join(problems) or None
