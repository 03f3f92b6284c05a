"""The manifest.parquet of a corpus: its Arrow schema, validation, atomic writes and checksums.

One row per volume. The manifest is the corpus's commit point: a volume exists when its row does.
Corpus-wide settings (format version, split ratios, shard size, the token of the last committed append)
live in the Parquet schema metadata under the key ``octssl``.

Format 2 added the optional native-resolution localizer (SLO / fundus image) of a volume: the columns
``localizer_grid``, ``localizer_index``, ``localizer_spacing_mm``, ``positions_mm`` and the ``localizer``
digest in ``sha256``. A format-1 manifest lacks them; it is read as "no localizer" (nulls).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from octssl.errors import CorpusError
from octssl.sample import ARRAY_KEYS, ENFACE_IMAGES, MASKS, VOLUME_KEY
from octssl.storage.files import atomic_file
from octssl.storage.location import Location

MANIFEST_NAME = "manifest.parquet"
FORMAT_VERSION = 2
SPLITS = ("train", "val", "test")
EYES = ("OD", "OS")
IMAGE_KEYS = (VOLUME_KEY, *ENFACE_IMAGES)
LABEL_KEYS = MASKS
#: The native-resolution localizer: its own buckets ``localizer/<H>x<W>``, never part of the sample dict
#: unless asked for (``Corpus.read(id, localizer=True)``).
LOCALIZER_KEY = "localizer"
STORED_KEYS = (*ARRAY_KEYS, LOCALIZER_KEY)  # every array with a digest in ``sha256``

SHA256_TYPE = pa.struct([(key, pa.string()) for key in STORED_KEYS])
POSITIONS_TYPE = pa.list_(pa.list_(pa.list_(pa.float64(), 2), 2))  # (nB, 2, 2)

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("patient", pa.string(), nullable=False),
        pa.field("eye", pa.string(), nullable=False),
        pa.field("visit", pa.int32(), nullable=False),
        pa.field("device", pa.string(), nullable=False),
        pa.field("scan_pattern", pa.string(), nullable=False),
        pa.field("raster", pa.bool_(), nullable=False),
        pa.field("raster_reason", pa.string()),  # why a volume is not a raster scan; null when it is
        pa.field("shape", pa.list_(pa.int32(), 3), nullable=False),  # (nB, D, W)
        pa.field("spacing_mm", pa.list_(pa.float64(), 3), nullable=False),  # along nB, D, W
        pa.field("modalities", pa.list_(pa.string()), nullable=False),  # images present: oct, faf, slo
        pa.field("labels", pa.list_(pa.string()), nullable=False),  # masks present: ga, rpd
        pa.field("split", pa.string(), nullable=False),
        pa.field("grid", pa.string(), nullable=False),  # bucket name "nBxDxW"
        pa.field("index", pa.int64(), nullable=False),  # row in the bucket's arrays
        pa.field("sha256", SHA256_TYPE, nullable=False),  # hex digest of each array's uint8 bytes
        pa.field("source", pa.string(), nullable=False),  # hash of the device file, or "synth:<seed>"
        pa.field("acquired", pa.date32()),  # acquisition day; null when unknown
        # The localizer at native resolution (format 2; all null when the volume has none):
        pa.field("localizer_grid", pa.string()),  # bucket name "HxW" of localizer/<H>x<W>
        pa.field("localizer_index", pa.int64()),  # row in that bucket
        # mm per localizer row, column (y, x): 2 numbers (checked per row). A variable-size list, not
        # list_(float64, 2): pyarrow 25 cannot read back a nullable fixed-size list holding nulls.
        pa.field("localizer_spacing_mm", pa.list_(pa.float64())),
        # registration, per stored B-scan [[start_x, start_y], [end_x, end_y]] in mm on the localizer (x right,
        # y down; pixel = mm / spacing); circle scans: "end" is the circle's centre. Null when unknown.
        pa.field("positions_mm", POSITIONS_TYPE),
        # why the registration cannot be right (B-scans off the localizer, a constant en-face image); null when
        # it passed the checks of octssl.ingest.registration. Such a volume stores no registered SLO.
        pa.field("registration_problem", pa.string()),
        # What the device recorded before ingest put the volume on the grid (null where unknown: synthetic
        # volumes, corpora written before these columns): its "nBxDxW", and whether any axis was upsampled.
        pa.field("native_shape", pa.string()),
        pa.field("upsampled", pa.bool_()),
    ]
)
#: Columns an older manifest lacks (format 1: all of them; format 2 before registration checks: the last); read as nulls.
LOCALIZER_COLUMNS = ("localizer_grid", "localizer_index", "localizer_spacing_mm", "positions_mm")
OPTIONAL_COLUMNS = (*LOCALIZER_COLUMNS, "registration_problem", "native_shape", "upsampled")

DEFAULT_SETTINGS: dict[str, Any] = {
    "format": FORMAT_VERSION,
    "split_ratios": [0.6, 0.2, 0.2],
    "shard_bytes": 256 * 2**20,
    "fraction_seed": 0,
    "append_token": None,
}

_GRID_RE = re.compile(r"^\d+x\d+x\d+$")
_LOCALIZER_GRID_RE = re.compile(r"^\d+x\d+$")
_HEX_RE = re.compile(r"^[0-9a-f]{64}$")


def parse_grid(text: str) -> tuple[int, int, int]:
    """``"49,128,512"`` or ``"49x128x512"`` -> (49, 128, 512); ValueError naming the text when malformed."""
    parts = text.replace("x", ",").split(",")
    try:
        grid = tuple(int(p) for p in parts)
    except ValueError:
        grid = ()
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"grid {text!r}: expected three positive integers NB,D,W such as 49,128,512")
    return grid[0], grid[1], grid[2]


def grid_name(shape: tuple[int, ...] | list[int]) -> str:
    """Bucket name of a volume shape, e.g. ``(16, 64, 64) -> "16x64x64"``."""
    return "x".join(str(int(n)) for n in shape)


def array_sha256(array: np.ndarray) -> str:
    """Hex sha256 of an array's C-order bytes (the checksum stored per array in the manifest)."""
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


@functools.lru_cache(maxsize=64)
def zeros_sha256(shape: tuple[int, ...]) -> str:
    """The digest :func:`array_sha256` gives an all-zero uint8 array of ``shape`` (what Zarr stores no file for)."""
    return hashlib.sha256(bytes(math.prod(shape))).hexdigest()


def empty_table(settings: dict[str, Any] | None = None) -> pa.Table:
    """A manifest with no rows, carrying ``settings`` (defaults filled in)."""
    return with_settings(SCHEMA.empty_table(), {**DEFAULT_SETTINGS, **(settings or {})})


def settings_of(table: pa.Table) -> dict[str, Any]:
    """The corpus settings stored in the manifest's schema metadata (defaults for absent keys)."""
    raw = (table.schema.metadata or {}).get(b"octssl")
    stored = json.loads(raw) if raw else {}
    if not isinstance(stored, dict):
        raise TypeError(f"expected a JSON object, got {type(stored).__name__}")
    return {**DEFAULT_SETTINGS, **stored}


def with_settings(table: pa.Table, settings: dict[str, Any]) -> pa.Table:
    """``table`` cast to SCHEMA with ``settings`` as its schema metadata."""
    schema = SCHEMA.with_metadata({b"octssl": json.dumps(settings).encode()})
    return table.cast(schema)


def rows_table(rows: list[dict[str, Any]], settings: dict[str, Any]) -> pa.Table:
    """Build a manifest table from row dicts (keys = SCHEMA names)."""
    return with_settings(pa.Table.from_pylist(rows, schema=SCHEMA), settings)


def read_manifest(path: Path | Location) -> pa.Table:
    """Read and validate ``path`` (a file or an object); CorpusError naming it (and the column) when it is
    missing or bad."""
    where = Location.parse(path)
    if not where.is_file():
        raise CorpusError(f"{path}: manifest is missing (not an octssl corpus, or it was never committed)")
    try:
        table = pq.read_table(where.path, filesystem=where.fs)
    except (pa.ArrowException, OSError) as err:
        raise CorpusError(f"{path}: cannot read manifest as Parquet: {err}{_pyarrow_hint(err)}") from err
    return checked_manifest(table, path)


def _pyarrow_hint(err: Exception) -> str:
    """What to do when an older octssl wrote a nullable fixed-size list that this pyarrow cannot read."""
    if "Expected all lists to be of size" in str(err):
        return (f" (a manifest written by an older octssl; pyarrow {pa.__version__} cannot read its "
                "localizer_spacing_mm column: read it once with pyarrow >= 26, which rewrites it on the next append)")
    return ""


def parse_manifest(data: bytes, where: str) -> pa.Table:
    """The manifest held in ``data`` (a manifest.parquet's bytes, e.g. stored in an icechunk snapshot),
    validated like :func:`read_manifest`; ``where`` names it in errors."""
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as err:
        raise CorpusError(f"{where}: cannot read manifest as Parquet: {err}{_pyarrow_hint(err)}") from err
    return checked_manifest(table, where)


def checked_manifest(table: pa.Table, path: Path | Location | str) -> pa.Table:
    """``table`` with the optional columns added and its schema and settings checked (CorpusError naming
    ``path`` otherwise)."""
    table = with_optional_columns(table)
    problems = schema_problems(table, str(path))
    if problems:
        raise CorpusError("; ".join(problems))
    try:
        settings = settings_of(table)
    except (ValueError, TypeError) as err:
        raise CorpusError(f"{path}: corpus settings (Parquet schema metadata 'octssl') are unreadable: {err}") from None
    return with_settings(table.select(SCHEMA.names), settings)


def manifest_sha256(corpus: str | Path | Location) -> str:
    """The version of the corpus at ``corpus`` (a folder or a published corpus's URL), pinned to the byte: the
    sha256 of its manifest.parquet, which holds every array's sha256 (so equal digests mean equal data); for an
    icechunk corpus the manifest stored in its snapshot."""
    from octssl.corpus.icechunk import version_of

    snapshot = version_of(corpus)
    if snapshot is not None:
        return snapshot["manifest_sha256"]
    path = Location.parse(corpus) / MANIFEST_NAME
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        raise CorpusError(f"{path}: manifest is missing (not an octssl corpus, or it was never committed)") from None


def with_optional_columns(table: pa.Table) -> pa.Table:
    """``table`` with every absent OPTIONAL_COLUMNS column added as nulls (an older format read as new)."""
    for name in OPTIONAL_COLUMNS:
        if name not in table.column_names:
            table = table.append_column(SCHEMA.field(name), pa.nulls(table.num_rows, SCHEMA.field(name).type))
    return table


def schema_problems(table: pa.Table, where: Path | str) -> list[str]:
    """Every column of SCHEMA that is missing or has a type that cannot be read as the expected one."""
    problems = []
    for field in SCHEMA:
        if field.name not in table.column_names:
            problems.append(f"{where}: column '{field.name}' is missing")
            continue
        actual = table.schema.field(field.name).type
        if actual != field.type:
            try:
                table.column(field.name).cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                problems.append(f"{where}: column '{field.name}' has type {actual}, expected {field.type}")
                continue
        if not field.nullable and table.column(field.name).null_count:
            problems.append(f"{where}: column '{field.name}' has null values")
    return problems


def row_problems(table: pa.Table, where: Path | str) -> list[str]:
    """Value problems of a schema-valid manifest: every bad row named by id and column."""
    problems: list[str] = []
    seen_ids: set[str] = set()
    seen_slots: dict[tuple[str, int], str] = {}
    for row in table.to_pylist():
        sid = row["id"]
        at = f"{where}: sample {sid}"
        if sid in seen_ids:
            problems.append(f"{at}: duplicate id")
        seen_ids.add(sid)
        if row["eye"] not in EYES:
            problems.append(f"{at}: column 'eye' is {row['eye']!r}, expected one of {EYES}")
        if row["split"] not in SPLITS:
            problems.append(f"{at}: column 'split' is {row['split']!r}, expected one of {SPLITS}")
        if not _GRID_RE.match(row["grid"]) or row["grid"] != grid_name(row["shape"]):
            problems.append(f"{at}: column 'grid' is {row['grid']!r} but shape is {row['shape']}")
        if row["index"] < 0:
            problems.append(f"{at}: column 'index' is negative ({row['index']})")
        slot = (row["grid"], row["index"])
        if slot in seen_slots:
            problems.append(f"{at}: grid {slot[0]} index {slot[1]} also used by sample {seen_slots[slot]}")
        seen_slots[slot] = sid
        present = list(row["modalities"]) + list(row["labels"])
        if VOLUME_KEY not in row["modalities"]:
            problems.append(f"{at}: column 'modalities' lacks 'oct'")
        bad = [k for k in row["modalities"] if k not in IMAGE_KEYS] + [
            k for k in row["labels"] if k not in LABEL_KEYS
        ]
        if bad:
            problems.append(f"{at}: unknown modality or label {bad}")
        for key in present:
            digest = (row["sha256"] or {}).get(key)
            if digest is None or not _HEX_RE.match(digest):
                problems.append(f"{at}: column 'sha256' has no valid digest for '{key}'")
        if any(not (s > 0 and np.isfinite(s)) for s in row["spacing_mm"]):
            problems.append(f"{at}: column 'spacing_mm' must hold 3 positive numbers, got {row['spacing_mm']}")
        problems += localizer_problems(row, at, seen_slots)
    return problems


def localizer_problems(row: dict[str, Any], at: str, seen_slots: dict[tuple[str, int], str]) -> list[str]:
    """Value problems of one row's localizer columns (all null, or a consistent set)."""
    grid = row.get("localizer_grid")
    if grid is None:
        given = [c for c in LOCALIZER_COLUMNS if row.get(c) is not None]
        return [f"{at}: columns {given} are set but 'localizer_grid' is null"] if given else []
    problems = []
    if not _LOCALIZER_GRID_RE.match(grid):
        problems.append(f"{at}: column 'localizer_grid' is {grid!r}, expected 'HxW'")
    index = row.get("localizer_index")
    if index is None or index < 0:
        problems.append(f"{at}: column 'localizer_index' is {index!r}, expected a row >= 0")
    else:
        slot = (f"{LOCALIZER_KEY}/{grid}", index)
        if slot in seen_slots:
            problems.append(f"{at}: localizer grid {grid} index {index} also used by sample {seen_slots[slot]}")
        seen_slots[slot] = row["id"]
    digest = (row["sha256"] or {}).get(LOCALIZER_KEY)
    if digest is None or not _HEX_RE.match(digest):
        problems.append(f"{at}: column 'sha256' has no valid digest for '{LOCALIZER_KEY}'")
    spacing = row.get("localizer_spacing_mm")
    if spacing is not None and any(not (s is not None and s > 0 and np.isfinite(s)) for s in spacing):
        problems.append(f"{at}: column 'localizer_spacing_mm' must hold 2 positive numbers, got {spacing}")
    positions = row.get("positions_mm")
    if positions is not None:
        try:
            array = np.asarray(positions, dtype=np.float64)  # a null number reads as NaN
        except (TypeError, ValueError):  # a null pair or point: ragged
            array = np.full((0,), np.nan)
        expected = (row["shape"][0], 2, 2)
        if array.shape != expected or not np.isfinite(array).all():
            got = f"shape {array.shape}" if array.size else "null entries"
            problems.append(f"{at}: column 'positions_mm' must be {expected} finite numbers (a start/end pair "
                            f"per B-scan), got {got}")
    return problems


def write_manifest(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` atomically (the commit point of every corpus change)."""
    with atomic_file(path) as handle:
        pq.write_table(table, handle)
