"""The prediction row: one volume's line in ``predictions.parquet/.csv``, one definition for writer and readers.

Every row carries what reproduces it: the bundle (path, weights sha256, threshold), the input grid the
model saw, the volume's spacing and native shape, and its source (the device file's path or the corpus,
and the source file's sha256), plus a ``warning`` when the input lies outside what the model was trained
on. ``schema_version`` is a column: readers of older tables (without it) see 0.
"""

from __future__ import annotations

import pyarrow as pa
from pydantic import BaseModel

SCHEMA_VERSION = 1


class PredictionRow(BaseModel):
    """One predicted volume (areas in mm^2 for raster volumes only; Dice/HD95 where a label exists)."""

    id: str
    patient: str | None = None
    eye: str | None = None
    visit: int | None = None
    acquired: str | None = None
    scan_pattern: str | None = None
    raster: bool = True
    split: str | None = None
    source: str  # the device file's path, or the corpus (path or URL) the volume was read from
    source_sha256: str | None = None  # the device file's sha256 (a corpus records it per volume)
    task: str
    threshold: float
    area_mm2: float | None = None
    area_reason: str | None = None
    lesions: int
    pixels: int
    label_area_mm2: float | None = None
    dice: float | None = None
    hd95_mm: float | None = None
    bundle: str  # the bundle's folder or URL
    weights_sha256: str
    input_grid: str  # "nBxDxW" the model saw (the bundle's grid for raster volumes)
    grid: str  # "nBxDxW" of the volume the areas are measured on
    spacing_mm: list[float]  # of that volume, along nB, D, W
    native_shape: list[int] | None = None  # the device's (nB, D, W) before any resampling
    warning: str | None = None  # the input is outside what the model was trained on
    schema_version: int = SCHEMA_VERSION


COLUMNS = tuple(PredictionRow.model_fields)

SCHEMA = pa.schema([
    ("id", pa.string()), ("patient", pa.string()), ("eye", pa.string()), ("visit", pa.int64()),
    ("acquired", pa.string()), ("scan_pattern", pa.string()), ("raster", pa.bool_()), ("split", pa.string()),
    ("source", pa.string()), ("source_sha256", pa.string()), ("task", pa.string()), ("threshold", pa.float64()),
    ("area_mm2", pa.float64()), ("area_reason", pa.string()), ("lesions", pa.int64()), ("pixels", pa.int64()),
    ("label_area_mm2", pa.float64()), ("dice", pa.float64()), ("hd95_mm", pa.float64()), ("bundle", pa.string()),
    ("weights_sha256", pa.string()), ("input_grid", pa.string()), ("grid", pa.string()),
    ("spacing_mm", pa.list_(pa.float64(), 3)), ("native_shape", pa.list_(pa.int64())), ("warning", pa.string()),
    ("schema_version", pa.int64()),
])
assert tuple(SCHEMA.names) == COLUMNS, "SCHEMA and PredictionRow list the same columns in the same order"
