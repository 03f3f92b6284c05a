"""Attaching en-face images and masks to volumes already in a corpus: the data half and the provenance table.

An attachment writes one ``(nB, W)`` array (``faf``, ``slo``, ``ga`` or ``rpd``) into the slot of an existing
volume. :meth:`octssl.corpus.store.Corpus.attach` runs it under the writer lock and the undo journal, like an
append: before a shard file is rewritten the journal backs it up (:meth:`Journal.protect_shards`); the
manifest (``labels``/``modalities`` and the ``sha256`` digest of each changed array) is the commit point. A
shard holds many volumes, so the whole shard slab is read, the attached slots replaced and the slab written
back: every other volume's arrays keep their bytes.

Provenance: ``attachments.parquet`` beside the manifest, one row per attached array (``id``, ``key``, the
stored array's ``sha256``, the source image's ``image_sha256``, ``pairs`` file, its ``row``, ``space``,
``time`` UTC). It is written before the manifest commits; a row counts only while its ``sha256`` equals the
manifest's digest of that array (:func:`read_provenance`), so rows of an attach that never committed, or of
an array attached again since, are ignored.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.storage import LocalStore

from octssl.corpus import manifest as mf
from octssl.corpus.layout import ZARR_NAME, array_path
from octssl.errors import CorpusError, SampleError
from octssl.storage.files import atomic_file
from octssl.vocab import ENFACE_IMAGES, ENFACE_KEYS, MASKS

if TYPE_CHECKING:
    from pathlib import Path

    from octssl.corpus.journal import Journal
    from octssl.corpus.store import Corpus

PROVENANCE_NAME = "attachments.parquet"
PROVENANCE_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("key", pa.string(), nullable=False),
    pa.field("sha256", pa.string(), nullable=False),  # of the stored uint8 array
    pa.field("image_sha256", pa.string()),  # of the source image file
    pa.field("pairs", pa.string()),  # the pairs table it came from (or the device file for ingest labels)
    pa.field("row", pa.int64()),  # 1-based data row of the pairs table
    pa.field("space", pa.string()),
    pa.field("time", pa.timestamp("s", tz="UTC"), nullable=False),
])


@dataclass
class Attachment:
    """One en-face array for one volume: ``array`` ``(nB, W)`` uint8 (masks 0/1) and where it came from."""

    sample_id: str
    key: str
    array: np.ndarray
    provenance: dict[str, Any] = field(default_factory=dict)


def checked(corpus: Corpus, attachment: Attachment) -> np.ndarray:
    """The attachment's array as stored, after checks; SampleError naming the corpus, sample and key."""
    at = f"{corpus.path}: sample {attachment.sample_id}"
    if attachment.key not in ENFACE_KEYS:
        raise SampleError(f"{at}: cannot attach {attachment.key!r}; en-face keys are {ENFACE_KEYS}")
    row = corpus.row(attachment.sample_id)
    shape = (row["shape"][0], row["shape"][2])
    array = np.asarray(attachment.array)
    if array.shape != shape or array.dtype != np.uint8:
        raise SampleError(f"{at}: '{attachment.key}' must be uint8 {shape} (the volume's en-face grid), got "
                          f"{array.dtype}{array.shape}")
    if attachment.key in MASKS and array.max(initial=0) > 1:
        raise SampleError(f"{at}: mask '{attachment.key}' must hold 0/1 values, got up to {array.max()}")
    return np.ascontiguousarray(array)


def write_attachments(corpus: Corpus, journal: Journal, attachments: list[Attachment]) -> list[dict[str, Any]]:
    """Write the arrays into their slots (shard slabs, journalled first); returns the new manifest rows."""
    arrays = {(a.sample_id, a.key): checked(corpus, a) for a in attachments}  # the last of duplicates wins
    by_array: dict[tuple[str, str], dict[int, np.ndarray]] = defaultdict(dict)
    for (sample_id, key), data in arrays.items():
        row = corpus.row(sample_id)
        by_array[(key, row["grid"])][row["index"]] = data
    store = LocalStore(corpus.folder / ZARR_NAME)
    for (key, grid), slots in by_array.items():
        name = array_path(key, grid)
        try:
            arr = zarr.open_array(store, path=name, mode="r+")
        except (FileNotFoundError, zarr.errors.NodeNotFoundError):
            raise CorpusError(f"{corpus.zarr_path / name}: array missing (the corpus was not written by octssl)") from None
        shard_len = (arr.shards or arr.chunks)[0]
        shards = sorted({index // shard_len for index in slots})
        journal.protect_shards(name, arr.shape[0], shard_len, shards)
        for shard in shards:
            lo, hi = shard * shard_len, min((shard + 1) * shard_len, arr.shape[0])
            slab = np.array(arr[lo:hi], dtype=np.uint8)
            for index, data in slots.items():
                if lo <= index < hi:
                    slab[index - lo] = data
            arr[lo:hi] = slab
    rows = [dict(row) for row in corpus.rows]
    position = {row["id"]: i for i, row in enumerate(rows)}
    for (sample_id, key), data in arrays.items():
        row = rows[position[sample_id]]
        row["sha256"] = {**row["sha256"], key: mf.array_sha256(data)}
        if key in ENFACE_IMAGES:
            row["modalities"] = [k for k in mf.IMAGE_KEYS if k in {*row["modalities"], key}]
        else:
            row["labels"] = [k for k in mf.LABEL_KEYS if k in {*row["labels"], key}]
    return rows


def record_provenance(corpus_dir: Path, attachments: list[Attachment]) -> None:
    """Add one provenance row per attachment to ``attachments.parquet`` (replaced atomically)."""
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    fresh = [{"id": a.sample_id, "key": a.key, "sha256": mf.array_sha256(np.ascontiguousarray(a.array)),
              "image_sha256": a.provenance.get("image_sha256"), "pairs": a.provenance.get("pairs"),
              "row": a.provenance.get("row"), "space": a.provenance.get("space"), "time": now}
             for a in attachments]
    path = corpus_dir / PROVENANCE_NAME
    old = _read(path)
    table = pa.concat_tables([old, pa.Table.from_pylist(fresh, schema=PROVENANCE_SCHEMA)])
    with atomic_file(path) as handle:
        pq.write_table(table, handle)


def read_provenance(corpus: Corpus) -> list[dict[str, Any]]:
    """The provenance rows that describe arrays as committed now (one per id and key, the latest)."""
    current: dict[tuple[str, str], dict[str, Any]] = {}
    for row in _read(corpus.folder / PROVENANCE_NAME).to_pylist():
        if row["id"] in corpus and (corpus.row(row["id"])["sha256"] or {}).get(row["key"]) == row["sha256"]:
            current[(row["id"], row["key"])] = row
    return list(current.values())


def _read(path: Path) -> pa.Table:
    if not path.exists():
        return PROVENANCE_SCHEMA.empty_table()
    try:
        return pq.read_table(path).cast(PROVENANCE_SCHEMA)
    except (pa.ArrowException, OSError) as err:
        raise CorpusError(f"{path}: unreadable provenance table ({err})") from err
