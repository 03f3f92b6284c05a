"""Pictures a person can check: the scanned region drawn on the localizer, en-face maps at their physical
aspect ratio, single-B-scan (line, circle) maps as readable bands, and the ingest preview of a volume.

Used by ``octssl ingest`` (``CORPUS/previews/<id>.png``) and ``octssl predict`` (``prob.png``, ``mask.png``,
``overlay.png``). PIL only, so a worker draws without matplotlib.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from octssl.ingest.grid import ascan_pixels

#: Width in pixels that en-face maps, B-scans and localizers are drawn at (a 768 x 1 line map was unreadable).
PANEL_WIDTH = 512
#: Height of the band a one-row en-face map (a line or circle scan) is drawn as.
BAND_HEIGHT = 48
SCAN_COLOUR = (255, 220, 0)  # the scanned region: yellow
FIRST_COLOUR = (0, 200, 255)  # the first B-scan: cyan, so the scan direction shows
LESION_COLOUR = (255, 0, 0)


def png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 grey (H, W) or RGB (H, W, 3) array."""

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", compress_level=3)  # ~3x faster than 6, no larger
    return buffer.getvalue()


def enface_size(shape: tuple[int, int], spacing_mm: tuple[float, float], width: int = PANEL_WIDTH) -> tuple[int, int]:
    """(width, height) in pixels that an en-face map of ``shape`` (rows, columns) with ``spacing_mm`` (mm per
    row, mm per column) is drawn at: its physical aspect ratio; one row (a line or circle scan) as a band."""
    rows, cols = shape
    if rows < 2 or spacing_mm[0] <= 0 or spacing_mm[1] <= 0:
        return width, BAND_HEIGHT
    return width, max(2, int(round(width * rows * spacing_mm[0] / (cols * spacing_mm[1]))))


def enface_image(array: np.ndarray, spacing_mm: tuple[float, float], *, mask: bool = False,
                 width: int = PANEL_WIDTH) -> np.ndarray:
    """A (nB, W) en-face map (uint8, or 0/1 when ``mask``) resized to :func:`enface_size`; nearest neighbour
    so that each B-scan stays a visible band."""

    values = np.asarray(array)
    grey = (values > 0).astype(np.uint8) * 255 if mask else np.clip(values, 0, 255).astype(np.uint8)
    size = enface_size(grey.shape, spacing_mm, width)
    return np.asarray(Image.fromarray(grey).resize(size, Image.Resampling.NEAREST))


def localizer_rgb(localizer: np.ndarray, spacing_mm: tuple[float, float]) -> tuple[Any, tuple[float, float]]:
    """The localizer as an RGB PIL image at its physical aspect ratio, and the (row, column) scale from
    localizer pixels to image pixels."""

    image = Image.fromarray(np.asarray(localizer, np.uint8)).convert("RGB")
    height, width = localizer.shape[:2]
    rows = max(1, int(round(height * spacing_mm[0] / spacing_mm[1])))
    image = image.resize((width, rows), Image.Resampling.BILINEAR) if rows != height else image
    return image, (rows / height, 1.0)


def draw_scan(image: Any, coords: np.ndarray, scale: tuple[float, float], pattern: str) -> None:
    """Draw the scanned region on ``image`` (PIL RGB, drawn on in place): every B-scan's path for up to 64
    B-scans (else the outline), the first B-scan in another colour. ``coords``: (2, nB, W) localizer pixels."""

    draw = ImageDraw.Draw(image)
    line = max(1, image.size[0] // 256)
    rows, cols = coords[0] * scale[0], coords[1] * scale[1]

    def path(b: int) -> list[tuple[float, float]]:
        return list(zip(cols[b].tolist(), rows[b].tolist(), strict=True))

    n_b = rows.shape[0]
    shown = range(n_b) if n_b <= 64 else (0, n_b - 1)
    for b in shown:
        draw.line(path(b), fill=SCAN_COLOUR, width=line)
    if n_b > 1 and pattern != "circle":  # close the raster's outline: the first and last A-scans of every B-scan
        for a in (0, -1):
            draw.line(list(zip(cols[:, a].tolist(), rows[:, a].tolist(), strict=True)), fill=SCAN_COLOUR, width=line)
    draw.line(path(0), fill=FIRST_COLOUR, width=line + 1)


def scan_on_localizer(localizer: np.ndarray, spacing_mm: tuple[float, float], positions_mm: np.ndarray, width: int,
                      pattern: str, eye: str, lesion: np.ndarray | None = None) -> np.ndarray:
    """RGB: the localizer at its physical aspect with the scanned region drawn, and (``lesion``, (nB, W)
    booleans) each lesion A-scan as a red mark at its place."""


    coords = ascan_pixels(spacing_mm, positions_mm, width, pattern, eye)
    image, scale = localizer_rgb(localizer, spacing_mm)
    draw_scan(image, coords, scale, pattern)
    if lesion is not None and lesion.any():
        rows, cols = coords[0] * scale[0], coords[1] * scale[1]
        step_b = np.median(np.hypot(np.diff(rows[:, 0]), np.diff(cols[:, 0]))) if lesion.shape[0] > 1 else 0.0
        step_w = np.median(np.hypot(np.diff(rows[0]), np.diff(cols[0]))) if lesion.shape[1] > 1 else 1.0
        half = max(2.0, 0.5 * max(step_b, step_w))  # a line scan's lesion stays visible over its path
        layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
        marks = ImageDraw.Draw(layer)
        for r, c in zip(rows[lesion], cols[lesion], strict=True):
            marks.rectangle([c - half, r - half, c + half, r + half], fill=(*LESION_COLOUR, 200))
        image = Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")
    return np.asarray(image)


def _fit_width(image: np.ndarray, width: int) -> np.ndarray:
    height = max(1, int(round(image.shape[0] * width / image.shape[1])))
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def _labelled(image: np.ndarray, text: str) -> np.ndarray:
    """``image`` (RGB) with a caption strip above it."""

    caption = Image.new("RGB", (image.shape[1], 14), (0, 0, 0))
    ImageDraw.Draw(caption).text((3, 1), text, fill=(255, 255, 255))
    return np.concatenate([np.asarray(caption), image])


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image


def _side_by_side(left: list[np.ndarray], right: list[np.ndarray]) -> np.ndarray:
    """Two columns of RGB panels (each column stacked top to bottom) on a black canvas."""
    columns = [np.concatenate(panels) for panels in (left, right) if panels]
    height = max(c.shape[0] for c in columns)
    padded = [np.pad(c, ((0, height - c.shape[0]), (0, 0), (0, 0))) for c in columns]
    gap = np.zeros((height, 8, 3), np.uint8)
    return np.concatenate([padded[0], *(x for c in padded[1:] for x in (gap, c))], axis=1)


def volume_preview(sample: dict[str, Any], localizer: np.ndarray | None = None,
                   localizer_spacing_mm: tuple[float, float] | None = None,
                   positions_mm: np.ndarray | None = None) -> np.ndarray:
    """The ingest preview of one stored volume (RGB): on the left the localizer with the scan positions drawn
    (when the volume has one) and the en-face OCT mean projection at its physical aspect; on the right the
    first, middle and last stored B-scans."""
    volume = np.asarray(sample["oct"])
    meta = sample["meta"]
    n_b, _, width = volume.shape
    spacing = meta["spacing_mm"]
    left = []
    if localizer is not None and localizer_spacing_mm is not None and positions_mm is not None:
        drawn = scan_on_localizer(localizer, localizer_spacing_mm, positions_mm, width, meta["scan_pattern"],
                                  meta["eye"])
        left.append(_labelled(_fit_width(drawn, PANEL_WIDTH), f"localizer: {meta['scan_pattern']} scan, "
                                                               f"{n_b} B-scan(s) (first in blue)"))
    projection = enface_image(volume.mean(axis=1), (spacing[0], spacing[2]))
    left.append(_labelled(_rgb(projection), f"OCT mean projection, {n_b * spacing[0]:.2f} mm (B-scans) x {width * spacing[2]:.2f} mm"
                          if n_b > 1 else f"OCT mean projection ({meta['scan_pattern']} scan, one row)"))
    if meta.get("registration_problem"):
        left.insert(0, _labelled(np.zeros((4, PANEL_WIDTH, 3), np.uint8), "REGISTRATION FLAGGED (no SLO stored)"))
    picks = sorted({0, n_b // 2, n_b - 1})
    right = [_labelled(_rgb(_fit_width(np.asarray(volume[b], np.uint8), PANEL_WIDTH)), f"B-scan {b + 1} of {n_b}")
             for b in picks]
    return _side_by_side(left, right)
