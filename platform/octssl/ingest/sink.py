"""Where ingest results land: the corpus (through one small adapter) and ``rejects.parquet`` beside it.

``rejects.parquet`` (path, sha256, reason, time UTC) lists every unit an ingest could not use, one row per
(path, sha256); a file rejected again keeps its first row. It is replaced atomically. Paths are stored as
given: name files without patient names if the corpus will be shared.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from octssl.corpus.layout import ZARR_NAME
from octssl.corpus.manifest import MANIFEST_NAME
from octssl.corpus.store import Corpus
from octssl.errors import CorpusError, IngestError
from octssl.storage.files import atomic_file

if TYPE_CHECKING:
    from octssl.corpus.store import Corpus
    from octssl.ingest.convert import Record

REJECTS_NAME = "rejects.parquet"
REJECTS_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("time", pa.timestamp("s", tz="UTC"), nullable=False),
    ]
)


def open_corpus(path: Path, key_fingerprint: str | None = None) -> Corpus:
    """Open the corpus at ``path``, creating an empty one (recording ``key_fingerprint``) when nothing is
    there yet."""

    if (path / MANIFEST_NAME).exists() or (path / ZARR_NAME).exists():
        return Corpus.open(path)
    return Corpus.create(path, key_fingerprint=key_fingerprint)


def ingested_sources(corpus: Corpus) -> set[str]:
    """Content hashes of every source file already in the corpus (the manifest's ``source`` column)."""
    if "source" not in corpus.manifest.column_names:
        raise CorpusError(f"{corpus.path}: manifest has no 'source' column; re-ingest cannot skip files")
    return {s for s in corpus.manifest.column("source").to_pylist() if s}


def append_records(corpus: Corpus, records: list[Record], settings: dict[str, Any] | None = None) -> list[str]:
    """The adapter to ``Corpus.append``: one atomic append of ``records``' sample dicts, each with its
    native-resolution localizer (``localizer/<H>x<W>``) and registration (``positions_mm``) when it has one.
    Each of ``settings`` the corpus does not record yet (key fingerprint, dates) is recorded in the same commit."""
    if not records:
        return []
    missing = {k: v for k, v in (settings or {}).items() if corpus.settings.get(k) is None}
    return corpus.append([_with_localizer(record) for record in records], progress=False, settings=missing or None)


def _with_localizer(record: Record) -> dict:
    """The append form of a record: the sample dict plus ``localizer`` and its meta (see ``Corpus.append``)."""
    if record.localizer is None:
        return record.sample
    meta = {**record.sample["meta"], "localizer_spacing_mm": record.localizer_spacing_mm,
            "positions_mm": record.positions_mm}
    return {**record.sample, "localizer": record.localizer, "meta": meta}


def read_rejects(corpus_dir: Path) -> pa.Table:
    path = corpus_dir / REJECTS_NAME
    if not path.exists():
        return REJECTS_SCHEMA.empty_table()
    try:
        return pq.read_table(path).cast(REJECTS_SCHEMA)
    except (pa.ArrowException, OSError) as err:
        raise IngestError(f"{path}: unreadable rejects table ({err})") from err


def record_rejects(corpus_dir: Path, rejects: list[tuple[str, str, str]]) -> pa.Table:
    """Add (path, sha256, reason) rows not already listed; rewrites the table only when it changes."""
    table = read_rejects(corpus_dir)
    known = set(zip(table.column("path").to_pylist(), table.column("sha256").to_pylist(), strict=True))
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    fresh = [
        {"path": p, "sha256": s, "reason": r, "time": now} for p, s, r in rejects if (p, s) not in known
    ]
    if not fresh:
        return table
    table = pa.concat_tables([table, pa.Table.from_pylist(fresh, schema=REJECTS_SCHEMA)])
    target = corpus_dir / REJECTS_NAME
    with atomic_file(target) as handle:
        pq.write_table(table, handle)
    return table
