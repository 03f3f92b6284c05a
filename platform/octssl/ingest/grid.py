"""Geometry of ingest: register the localizer onto the B-scans and resample raster volumes to the corpus grid.

Registration (``localizer_trace``): for every B-scan, the localizer is sampled (bilinear) at the W points
where its A-scans hit the fundus: evenly along the segment start -> end for line, raster and radial
scans; along the circle through the start point around the centre for circle scans. The result is an
``(nB, W)`` en-face image on the volume's own grid, i.e. ``slo`` exactly under each A-scan.

Circle direction: Heyex circle scans run temporal -> superior -> nasal -> inferior (TSNIT). On the real
right-eye Spectralis test file (a Heidelberg .vol circle scan) this is the direction whose SLO trace matches the B-scan's vessel shadows
(correlation 0.54 vs -0.08 the other way); left eyes are mirrored (TSNIT again), an assumption no test
file covers yet.

Corpus grid (``to_grid``), raster volumes only:
- depth: a window of ``depth_mm`` (default 1.0 mm) centred on the retina, i.e. on the intensity-weighted
  centre of the bright rows of the mean A-scan (rows above background + 30% of the peak contrast); the
  whole depth when the device records less. A fixed physical window keeps one depth scale across devices
  (Spectralis: 258 of 496 rows of 3.87 um), and it holds the retina with room for tilt and pathology.
- then every axis is resized linearly to the grid ``(nB, D, W)`` with anti-aliasing when shrinking
  (``skimage.transform.resize``); the en-face ``slo`` follows the same (nB, W) resize. ``spacing_mm`` is
  rescaled to match, so it stays the physical size of a grid voxel.
- the registration follows too (``grid_positions``): the resize maps pixel centres (``ndi.zoom`` with
  ``grid_mode=True``: output index i sits at input coordinate ``(i + 0.5) * n / g - 0.5``, clamped to the
  edge), so each stored B-scan's start/end is interpolated at those coordinates: B-scans linearly between
  neighbouring native B-scans, the first/last stored A-scan along the native B-scan's segment.
"""

from __future__ import annotations

import numpy as np

from octssl.ingest.scan import CIRCLE

DEPTH_WINDOW_MM = 1.0


def localizer_trace(
    localizer: np.ndarray,
    spacing_mm: tuple[float, float],
    positions_mm: np.ndarray,
    width: int,
    pattern: str,
    laterality: str,
) -> np.ndarray:
    """The localizer sampled under every A-scan: ``(nB, width)`` float32 (see the module docstring)."""
    from scipy.ndimage import map_coordinates

    row_mm, col_mm = spacing_mm
    start = positions_mm[:, 0, :]  # (nB, 2) x, y in mm
    end = positions_mm[:, 1, :]
    if pattern == CIRCLE:
        centre = end
        radius = np.linalg.norm(start - centre, axis=1)[:, None]
        phase = np.arctan2(start[:, 1] - centre[:, 1], start[:, 0] - centre[:, 0])[:, None]
        # Image y points down: increasing angle from a temporal start on OD moves up (superior).
        sense = 1.0 if laterality != "OS" else -1.0
        angle = phase + sense * 2.0 * np.pi * np.arange(width)[None, :] / width
        xs = centre[:, 0:1] + radius * np.cos(angle)
        ys = centre[:, 1:2] + radius * np.sin(angle)
    else:
        t = np.linspace(0.0, 1.0, width)[None, :]
        xs = start[:, 0:1] + (end[:, 0:1] - start[:, 0:1]) * t
        ys = start[:, 1:2] + (end[:, 1:2] - start[:, 1:2]) * t
    coords = np.stack([ys / row_mm, xs / col_mm])  # (2, nB, W) in pixel (row, col)
    return map_coordinates(localizer.astype(np.float32), coords, order=1, mode="nearest").astype(np.float32)


def retina_window(bscans: np.ndarray, depth_spacing_mm: float, depth_mm: float = DEPTH_WINDOW_MM) -> slice:
    """Rows of the depth window of ``depth_mm`` centred on the retina (the whole depth if shorter)."""
    depth = bscans.shape[1]
    rows = depth if depth_spacing_mm <= 0 else int(round(depth_mm / depth_spacing_mm))
    if rows >= depth:
        return slice(0, depth)
    profile = bscans.mean(axis=(0, 2), dtype=np.float64)
    background = float(np.median(profile))
    bright = profile - background
    bright[bright < 0.3 * bright.max()] = 0.0
    centre = depth / 2 if bright.sum() <= 0 else float((np.arange(depth) * bright).sum() / bright.sum())
    top = int(round(centre - rows / 2))
    top = min(max(top, 0), depth - rows)
    return slice(top, top + rows)


def resize(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Linear resize to ``shape`` (anti-aliased when shrinking), back to uint8."""
    from skimage.transform import resize as sk_resize

    if tuple(array.shape) == tuple(shape):
        return np.asarray(array, dtype=np.uint8) if array.dtype == np.uint8 else _to_uint8(array)
    out = sk_resize(
        array.astype(np.float32), shape, order=1, anti_aliasing=True, preserve_range=True, mode="edge"
    )
    return _to_uint8(out)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def _centres(native: int, target: int) -> np.ndarray:
    """Input coordinate of each output pixel centre of a ``native -> target`` resize (as ``resize`` samples)."""
    return np.clip((np.arange(target) + 0.5) * native / target - 0.5, 0.0, native - 1.0)


def grid_positions(positions_mm: np.ndarray, native: tuple[int, int], target: tuple[int, int]) -> np.ndarray:
    """Raster registration ``(nB, 2, 2)`` of a native ``(nB, W)`` en-face grid moved to ``target`` (g_B, g_W)."""
    positions = np.asarray(positions_mm, dtype=np.float64)
    b = _centres(native[0], target[0])
    low = np.floor(b).astype(int)
    high = np.minimum(low + 1, native[0] - 1)
    frac = (b - low)[:, None, None]
    rows = positions[low] * (1.0 - frac) + positions[high] * frac  # (g_B, 2, 2): native segments between
    ends = _centres(native[1], target[1])[[0, -1]] / max(native[1] - 1, 1)  # fraction along the segment
    start, stop = rows[:, 0, :], rows[:, 1, :]
    return np.stack([start + (stop - start) * ends[0], start + (stop - start) * ends[1]], axis=1)


def to_grid(
    bscans: np.ndarray,
    slo: np.ndarray | None,
    spacing_mm: tuple[float, float, float],
    grid: tuple[int, int, int],
    depth_mm: float = DEPTH_WINDOW_MM,
) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float, float]]:
    """Crop depth to the retina window and resize to ``grid``; returns (oct, slo, spacing_mm) on the grid."""
    window = retina_window(bscans, spacing_mm[1], depth_mm)
    cropped = bscans[:, window, :]
    n_b, depth, width = cropped.shape
    g_b, g_d, g_w = grid
    volume = resize(cropped, grid)
    enface = None if slo is None else resize(slo, (g_b, g_w))
    spacing = (
        spacing_mm[0] * (n_b - 1) / (g_b - 1) if g_b > 1 and n_b > 1 else spacing_mm[0],
        spacing_mm[1] * depth / g_d,
        spacing_mm[2] * width / g_w,
    )
    return volume, enface, spacing
