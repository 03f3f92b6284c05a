"""Pairs tables: en-face images and masks (FAF, SLO, GA, RPD) attached to volumes of a corpus.

A pairs table is a CSV with the columns ``volume`` (a device file or stack folder as given to ingest,
matched by content hash to the manifest's ``source``, or a corpus volume id), ``kind`` (``faf``, ``slo``,
``ga``, ``rpd``), ``image`` (PNG/TIFF/BMP, relative to the CSV's folder), ``space`` and, for ``affine``,
``matrix``. Spaces:

- ``localizer``: the image lies on the pixel grid of the volume's native localizer (same size);
- ``enface``: the image is already on the volume's stored ``(nB, W)`` grid;
- ``affine``: another image; ``matrix`` holds six numbers ``a b c d e f`` (spaces or commas) of the 2x3
  affine mapping its pixel (x, y) to localizer pixels ``(a x + b y + c, d x + e y + f)``.

``localizer`` and ``affine`` images are sampled under every A-scan through the volume's registration
(``positions_mm``, as ``slo`` is made at ingest; :func:`octssl.ingest.grid.enface_from_localizer`), so raster
volumes, line and circle scans are treated alike; masks nearest-neighbour, images bilinear; a scan whose
A-scans fall off the localizer (or off an ``affine`` image) is refused, never sampled. Every row that cannot be
used goes to ``rejects.parquet`` with its reason (``path`` = ``PAIRS.csv:line N``): a volume that is a FIFO,
device file or link to one, or a second row for a volume and kind already attached by the table, rejects that
row only; the others are attached in one atomic :meth:`Corpus.attach`.
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from octssl.corpus.attach import Attachment
from octssl.corpus.store import Corpus
from octssl.errors import IngestError
from octssl.ingest import sink
from octssl.ingest.detect import content_hash
from octssl.ingest.grid import ascan_pixels, enface_from_localizer, sample_at
from octssl.vocab import ENFACE_KEYS, MASKS

LOCALIZER, ENFACE, AFFINE = "localizer", "enface", "affine"
SPACES = (LOCALIZER, ENFACE, AFFINE)
COLUMNS = ("volume", "kind", "image", "space")
#: A-scans may fall this far (pixels) outside an ``affine`` image and still count as covered
EDGE_PX = 1.0


class RowRejected(Exception):
    """One pairs row cannot be used; the message is the reason."""


@dataclass
class PairRow:
    line: int
    volume: str
    kind: str
    image: str
    space: str
    matrix: str = ""


@dataclass
class LabelReport:
    """What ``octssl label`` did: ``attached`` (id, kind, line) and ``rejected`` (where, reason)."""

    corpus: str
    pairs: str
    attached: list[tuple[str, str, int]] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)


def read_pairs(path: Path) -> list[PairRow]:
    """The rows of a pairs CSV; IngestError naming the file when it is unreadable or lacks a column."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip() for h in reader.fieldnames or []]
            missing = [c for c in COLUMNS if c not in header]
            if missing:
                raise IngestError(f"{path}: pairs table lacks column(s) {missing}; it needs {list(COLUMNS)} "
                                  "(and 'matrix' for affine rows)")
            rows = []
            for number, raw in enumerate(reader, start=2):
                cells = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
                rows.append(PairRow(number, cells["volume"], cells["kind"].lower(), cells["image"],
                                    cells["space"].lower(), cells.get("matrix", "")))
            return rows
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise IngestError(f"{path}: cannot read pairs table ({err})") from err


def read_image(path: Path, mask: bool) -> np.ndarray:
    """A greyscale image as uint8 (16-bit scaled to 8); masks as 0/1 (any two values 0 and v > 0)."""

    try:
        with Image.open(path) as image:
            if image.mode in ("I;16", "I;16B", "I;16L", "I") and not mask:
                array = np.clip(np.rint(np.asarray(image, np.float32) * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
            else:
                array = np.asarray(image if image.mode in ("1", "I;16", "I;16B", "I;16L", "I") else image.convert("L"))
    except (UnidentifiedImageError, OSError) as err:
        raise RowRejected(f"unreadable image {path} ({err})") from err
    if not mask:
        return np.asarray(array, np.uint8)
    values = np.unique(array)
    if len(values) > 2 or (len(values) == 2 and values[0] != 0):
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise RowRejected(f"mask {path} is not binary (values {shown}); masks hold 0 and one other value")
    return (array > 0).astype(np.uint8)


def parse_matrix(text: str) -> np.ndarray:
    """Six numbers -> the 3x3 homogeneous affine (image pixel -> localizer pixel)."""
    parts = text.replace(",", " ").replace(";", " ").split()
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) != 6 or not all(math.isfinite(n) for n in numbers):
        raise RowRejected(f"matrix {text!r} must be six finite numbers 'a b c d e f' (image x, y -> localizer)")
    matrix = np.array([numbers[:3], numbers[3:], [0.0, 0.0, 1.0]])
    if abs(np.linalg.det(matrix)) < 1e-12:
        raise RowRejected(f"matrix {text!r} is singular (it does not map the image onto a plane)")
    return matrix


def onto_volume(row: dict[str, Any], sample: dict[str, Any], image: np.ndarray, pair: PairRow) -> np.ndarray:
    """The pairs image as the volume's ``(nB, W)`` uint8 en-face array (masks 0/1); RowRejected with the reason."""
    mask = pair.kind in MASKS
    grid = (row["shape"][0], row["shape"][2])
    if pair.space == ENFACE:
        if image.shape != grid:
            raise RowRejected(f"image is {image.shape[0]}x{image.shape[1]}, the volume's en-face grid is "
                              f"{grid[0]}x{grid[1]} (nB x W) for space 'enface'")
        return np.ascontiguousarray(image, np.uint8)
    localizer = sample.get("localizer")
    meta = sample["meta"]
    if localizer is None or meta.get("positions_mm") is None or meta.get("localizer_spacing_mm") is None:
        raise RowRejected(f"volume {row['id']} has no localizer with a registration; space '{pair.space}' "
                          "needs one (use 'enface')")
    geometry = (meta["localizer_spacing_mm"], meta["positions_mm"], grid[1], row["scan_pattern"], row["eye"])
    if pair.space == LOCALIZER:
        if image.shape != localizer.shape:
            raise RowRejected(f"image is {image.shape[0]}x{image.shape[1]}, the volume's localizer is "
                              f"{localizer.shape[0]}x{localizer.shape[1]} (space 'localizer' needs the same size)")
        _check_on_localizer(geometry, localizer.shape)
        return enface_from_localizer(image, *geometry, mask=mask)
    matrix = parse_matrix(pair.matrix)
    height, width = image.shape
    corners = matrix @ np.array([[0, width - 1, 0, width - 1], [0, 0, height - 1, height - 1], [1, 1, 1, 1]])
    lh, lw = localizer.shape
    if corners[0].max() < 0 or corners[0].min() > lw - 1 or corners[1].max() < 0 or corners[1].min() > lh - 1:
        raise RowRejected(f"matrix maps the image off the localizer (corners x {corners[0].min():.0f}.."
                          f"{corners[0].max():.0f}, y {corners[1].min():.0f}..{corners[1].max():.0f}; localizer "
                          f"{lw}x{lh})")

    rows_cols = ascan_pixels(*geometry)  # (2, nB, W) localizer (row, col)
    points = np.linalg.inv(matrix) @ np.stack([rows_cols[1].ravel(), rows_cols[0].ravel(), np.ones(rows_cols[0].size)])
    outside = ((points[0] < -EDGE_PX) | (points[0] > width - 1 + EDGE_PX)
               | (points[1] < -EDGE_PX) | (points[1] > height - 1 + EDGE_PX))
    if outside.any():
        raise RowRejected(f"the image does not cover the scan: {int(outside.sum())} of {outside.size} A-scans "
                          "fall outside it through this matrix")
    coords = np.stack([points[1], points[0]]).reshape(2, *rows_cols.shape[1:])
    values = sample_at(image, coords, order=0 if mask else 1)
    if mask:
        return (values >= 0.5).astype(np.uint8)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _check_on_localizer(geometry: tuple[Any, ...], shape: tuple[int, ...]) -> None:
    """RowRejected when A-scans fall off the localizer: sampling there would invent values (for a mask, a
    silent "no lesion" that becomes ground truth)."""

    rows, cols = ascan_pixels(*geometry)
    height, width = shape
    outside = (rows < -EDGE_PX) | (rows > height - 1 + EDGE_PX) | (cols < -EDGE_PX) | (cols > width - 1 + EDGE_PX)
    if outside.any():
        raise RowRejected(f"the scan does not lie on the localizer: {int(outside.sum())} of {outside.size} A-scans "
                          f"fall outside its {width}x{height} pixels through the volume's registration")


class _Volumes:
    """Resolves the ``volume`` column: a corpus id, or a device file / stack folder found by content hash."""

    def __init__(self, corpus: Corpus, base: Path) -> None:
        self.corpus, self.base = corpus, base
        self.by_source: dict[str, list[str]] = {}
        for r in corpus.rows:
            self.by_source.setdefault(r["source"], []).append(r["id"])
        self.hashes: dict[Path, str] = {}
        self.samples: dict[str, dict[str, Any]] = {}

    def ids(self, value: str) -> list[str]:
        if not value:
            raise RowRejected("empty 'volume'")
        if value in self.corpus:
            return [value]
        path = Path(value) if Path(value).is_absolute() else self.base / value
        if not path.exists():
            raise RowRejected(f"unknown volume {value!r}: neither a corpus volume id nor an existing file or folder")
        try:
            path = path.resolve()
            if path not in self.hashes:
                self.hashes[path] = content_hash(path)
        except OSError as err:
            raise RowRejected(f"cannot read volume file {path} ({err})") from err
        except IngestError as err:  # a FIFO, device file or symlink to one: this row only
            raise RowRejected(f"volume {value!r}: {err}") from err
        ids = self.by_source.get(self.hashes[path], [])
        if not ids:
            raise RowRejected(f"unknown volume {value!r}: no volume in the corpus was ingested from it")
        return ids

    def sample(self, sample_id: str) -> dict[str, Any]:
        """The volume's localizer and registration (its other arrays are not read)."""
        if sample_id not in self.samples:
            row = self.corpus.row(sample_id)
            meta = {"positions_mm": None if row["positions_mm"] is None else np.asarray(row["positions_mm"]),
                    "localizer_spacing_mm": row["localizer_spacing_mm"]}
            sample: dict[str, Any] = {"meta": meta}
            if row["localizer_grid"] is not None:
                sample["localizer"] = self.corpus.read_array("localizer", row)
            self.samples[sample_id] = sample
        return self.samples[sample_id]


def pair_attachments(corpus: Corpus, pairs_path: Path) -> tuple[list[Attachment], list[tuple[str, str, str]]]:
    """Every usable row as attachments (one per matching volume), and (where, image sha256, reason) rejects."""
    pairs_path = Path(pairs_path)
    volumes = _Volumes(corpus, pairs_path.parent)
    attachments: list[Attachment] = []
    rejects: list[tuple[str, str, str]] = []
    first_line: dict[tuple[str, str], int] = {}  # (volume id, kind) -> the row that attaches it
    for pair in read_pairs(pairs_path):
        where, digest = f"{pairs_path}:line {pair.line}", ""
        try:
            if pair.kind not in ENFACE_KEYS:
                raise RowRejected(f"unknown kind {pair.kind!r}; expected one of {ENFACE_KEYS}")
            if pair.space not in SPACES:
                raise RowRejected(f"unknown space {pair.space!r}; expected one of {SPACES}")
            ids = volumes.ids(pair.volume)
            image_path = Path(pair.image) if Path(pair.image).is_absolute() else pairs_path.parent / pair.image
            if not pair.image or not image_path.is_file():
                raise RowRejected(f"image {pair.image!r} not found (looked at {image_path})")
            digest = hashlib.sha256(image_path.read_bytes()).hexdigest()
            image = read_image(image_path, mask=pair.kind in MASKS)
            made = [Attachment(i, pair.kind, onto_volume(corpus.row(i), volumes.sample(i), image, pair),
                               {"image_sha256": digest, "pairs": str(pairs_path), "row": pair.line,
                                "space": pair.space}) for i in ids]
            _check_not_duplicate(first_line, ids, pair)
        except RowRejected as err:
            rejects.append((where, digest, str(err)))
            continue
        attachments += made
        first_line.update({(i, pair.kind): pair.line for i in ids})
    return attachments, rejects


def _check_not_duplicate(first_line: dict[tuple[str, str], int], ids: list[str], pair: PairRow) -> None:
    """RowRejected when an earlier row of the table already attaches this kind to one of these volumes: one
    label per volume and kind, and the report counts what lands."""
    for sample_id in ids:
        if (sample_id, pair.kind) in first_line:
            raise RowRejected(f"duplicate: volume {sample_id} already gets '{pair.kind}' from line "
                              f"{first_line[(sample_id, pair.kind)]} of this table")


def label_corpus(corpus_path: str | Path, pairs_path: str | Path) -> LabelReport:
    """Attach a pairs table to the corpus at ``corpus_path`` (one atomic attach); bad rows to rejects.parquet."""
    corpus_path, pairs_path = Path(corpus_path), Path(pairs_path)
    if not pairs_path.is_file():
        raise IngestError(f"{pairs_path}: pairs table not found")
    corpus = Corpus.open(corpus_path)
    attachments, rejects = pair_attachments(corpus, pairs_path)
    corpus.attach(attachments)
    sink.record_rejects(corpus_path, rejects)
    report = LabelReport(corpus=str(corpus_path), pairs=str(pairs_path))
    report.attached = [(a.sample_id, a.key, int(a.provenance["row"])) for a in attachments]
    report.rejected = [(where, reason) for where, _, reason in rejects]
    return report
