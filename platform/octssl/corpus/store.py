"""Corpus: the one corpus interface (open, query, read, append, attach), whatever its backend.

Layout: ``volumes.zarr`` holds per grid bucket (volumes of one shape ``nBxDxW``) the arrays ``oct/<grid>``
``[N, nB, D, W]`` and ``faf|slo|ga|rpd/<grid>`` ``[N, nB, W]``, uint8, one volume per chunk, many chunks
per shard (sharding codec, ~256 MiB shards), zstd with a content checksum. A missing modality leaves the
fill value (0) in its slot and is absent from the row's ``modalities``/``labels``. A volume's optional
native-resolution localizer (SLO / fundus) lives in buckets of its own, ``localizer/<H>x<W>`` ``[N, H, W]``
(same chunking and codecs), found by the row's ``localizer_grid``/``localizer_index``; it is read only when
asked (``read(id, localizer=True)``), so the training sample dict never carries it. The manifest
(``manifest.parquet`` and the parts of later appends, ``octssl.corpus.parts``) is the commit point; see
``octssl.corpus.journal`` for how a crashed append is undone.

:meth:`Corpus.open` is the one function that opens a corpus and picks its backend: a folder or a published
copy on an object store (``octssl publish``, read-only; :class:`octssl.corpus.backends.ZarrBackend`), or an
icechunk repository at a snapshot (:class:`octssl.corpus.repository.IcechunkBackend`). The rows stay one
columnar Arrow table: a million-volume manifest opens in about a second and a few hundred MB, and a row
becomes a dict only when asked for (:class:`Rows`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import zarr
from zarr.storage import LocalStore

from octssl.corpus import manifest as mf
from octssl.corpus import parts
from octssl.corpus.attach import record_provenance, write_attachments
from octssl.corpus.audit import summarize, verify_corpus
from octssl.corpus.backends import ZarrBackend
from octssl.corpus.journal import Journal, WriterLock
from octssl.corpus.layout import ZARR_NAME, holders_of, label_fraction_patients, meta_of, slot
from octssl.corpus.repository import IcechunkBackend, is_repository, split_snapshot
from octssl.corpus.writer import AppendWriter
from octssl.errors import CorpusError
from octssl.sample import VOLUME_KEY
from octssl.storage.location import Location

ROW_BATCH = 8192  # rows converted to dicts at a time while iterating


class Rows(Sequence[dict[str, Any]]):
    """The manifest rows as a read-only sequence of dicts, made from the Arrow table when asked for: a row
    costs ~30 us to convert, a million-row corpus would cost gigabytes and seconds as dicts up front."""

    def __init__(self, table: pa.Table) -> None:
        self._table = table

    def __len__(self) -> int:
        return self._table.num_rows

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return self._table.slice(index % len(self), 1).to_pylist()[0]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self._table.to_batches(max_chunksize=ROW_BATCH):
            yield from batch.to_pylist()

    def __eq__(self, other: object) -> bool:
        """Equal to another Rows or a list holding the same rows (as the list of dicts it replaces was)."""
        if isinstance(other, (Rows, list)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


class _Index:
    """Rows by the value of one string column: sorted (hash, row) pairs, two int64 per row (a Python dict of a
    million ids would hold ~150 MB); built on first use."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        self.column = column
        hashes = np.fromiter((hash(s) for s in column.to_pylist()), np.int64, len(column))
        order = np.argsort(hashes, kind="stable")
        self.keys, self.rows = hashes[order], order

    def extend(self, column: pa.ChunkedArray, old: int) -> None:
        """Add the rows from ``old`` on of ``column`` (the grown column; the first ``old`` rows are indexed)."""
        hashes = np.fromiter((hash(s) for s in column.slice(old).to_pylist()), np.int64, len(column) - old)
        order = np.argsort(hashes, kind="stable")
        at = np.searchsorted(self.keys, hashes[order], side="right")
        self.keys = np.insert(self.keys, at, hashes[order])
        self.rows = np.insert(self.rows, at, order + old)
        self.column = column

    def first(self, value: object) -> int | None:
        """The first row holding ``value``; None when none does."""
        wanted = hash(value)
        for at in range(int(np.searchsorted(self.keys, wanted)), len(self.keys)):
            if self.keys[at] != wanted:
                break
            if self.column[int(self.rows[at])].as_py() == value:
                return int(self.rows[at])
        return None


class Corpus:
    """One corpus. Readers see committed rows only; one writer appends at a time."""

    # Test seam: called with "flushed" (a shard slab written), "written" (all data written, manifest not yet
    # committed) and "committed" (manifest committed, journal not yet dropped); crash tests kill the process here.
    append_hook: ClassVar[Callable[[str], None] | None] = None

    def __init__(self, backend: ZarrBackend, table: pa.Table, committed: parts.Committed | None = None) -> None:
        """``committed``: what a local corpus's manifest files held when ``table`` was read from them."""
        self.backend = backend
        self.path = backend.path
        self.remote = backend.read_only  # on an object store or in a snapshot: read-only
        self.manifest_path = backend.manifest_path
        self.zarr_path = backend.zarr_path
        self.snapshot_id = backend.snapshot_id
        self._committed = committed  # a writer re-reads only the manifest files changed since
        self._set_table(table)

    @property
    def folder(self) -> Path:
        """The corpus folder on this machine, what writers, locks and journals work in (a corpus published to
        an object store has none: it is read-only)."""
        if isinstance(self.path, Path) and not self.remote:
            return self.path
        raise CorpusError(f"{self.path}: a published corpus is read-only; append locally and publish again")

    @property
    def version(self) -> str:
        """The corpus version, pinned to the byte (:func:`corpus_version`)."""
        return self.backend.version()

    # ---- lifecycle -------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        split_ratios: tuple[float, float, float] = (0.6, 0.2, 0.2),
        shard_bytes: int = 256 * 2**20,
        fraction_seed: int = 0,
        key_fingerprint: str | None = None,
        volume_chunk: tuple[int, int] | None = None,
    ) -> Corpus:
        """A new empty corpus at ``path`` (CorpusError if a corpus is already there). ``key_fingerprint``:
        the pseudonym key's fingerprint that later ingests must match (``octssl.ingest.phi``).
        ``volume_chunk``: B-scans x A-scans per stored chunk of every OCT volume (default: sub-volume chunks
        for large volumes only, ``octssl.corpus.layout.volume_chunking``)."""
        path = Path(path)
        if volume_chunk is not None and (len(volume_chunk) != 2 or min(volume_chunk) < 1):
            raise CorpusError(f"{path}: volume_chunk must be 2 positive sizes (B-scans, A-scans), got {volume_chunk}")
        if (path / mf.MANIFEST_NAME).exists() or (path / ZARR_NAME).exists():
            raise CorpusError(f"{path}: a corpus already exists here")
        if len(split_ratios) != 3 or min(split_ratios) < 0 or sum(split_ratios) <= 0:
            raise CorpusError(f"{path}: split_ratios must be 3 non-negative numbers, got {split_ratios}")
        if path.exists() and not path.is_dir():
            raise CorpusError(f"{path}: is a file, not a folder for a corpus")
        path.mkdir(parents=True, exist_ok=True)
        with WriterLock(path):
            # Again under the lock: another creator may have committed since the check above.
            if (path / mf.MANIFEST_NAME).exists() or (path / ZARR_NAME).exists():
                raise CorpusError(f"{path}: a corpus already exists here")
            zarr.open_group(LocalStore(path / ZARR_NAME), mode="w-", zarr_format=3)
            settings = {"split_ratios": list(split_ratios), "shard_bytes": int(shard_bytes),
                        "fraction_seed": int(fraction_seed)}
            if key_fingerprint is not None:
                settings["key_fingerprint"] = key_fingerprint
            if volume_chunk is not None:
                settings["volume_chunk"] = [int(n) for n in volume_chunk]
            table = mf.empty_table(settings)
            mf.write_manifest(table, path / mf.MANIFEST_NAME)
        return cls(ZarrBackend(path), table)

    @classmethod
    def open(cls, path: str | Path | Location) -> Corpus:
        """Open a committed corpus, choosing its backend: a folder (an interrupted append is undone first when
        no writer is active), a published corpus's URL (read-only), or an icechunk repository (``URL`` or
        ``URL@SNAPSHOT_ID``, read-only at that snapshot)."""
        where, snapshot = split_snapshot(path)
        if snapshot is not None or is_repository(where):
            backend = IcechunkBackend.at(where, snapshot)
            return cls(backend, backend.manifest())
        if where.remote:  # the manifest is uploaded last: without it there is no corpus yet
            table = mf.read_manifest(where / mf.MANIFEST_NAME)
            if not (where / ZARR_NAME / "zarr.json").is_file():
                raise CorpusError(f"{where / ZARR_NAME}: missing (a published corpus needs manifest.parquet and volumes.zarr)")
            return cls(ZarrBackend(where), table)
        folder = where.local
        if not folder.is_dir():
            raise CorpusError(f"{folder}: no corpus directory here")
        if not (folder / ZARR_NAME / "zarr.json").is_file():
            raise CorpusError(f"{folder / ZARR_NAME}: missing (a corpus needs manifest.parquet and volumes.zarr)")
        journal = Journal(folder, folder / ZARR_NAME)
        # Undo an interrupted append when no writer is active; a reader without write access reads the
        # committed rows as they are and leaves recovery to the next writer.
        if journal.pending and os.access(folder, os.W_OK):
            lock = WriterLock(folder)
            if lock.try_acquire():
                try:
                    journal.recover(parts.read(folder).token)
                finally:
                    lock.release()
        committed = parts.read(folder)
        return cls(ZarrBackend(folder), committed.table, committed)

    def _set_table(self, table: pa.Table) -> None:
        self._table = table
        self.settings = mf.settings_of(table)
        self._by_id: _Index | None = None  # built on the first lookup
        self._by_patient: _Index | None = None
        self._held: dict[str, dict[str, set[str]]] | None = None  # holders(), built on first use

    def _grow(self, table: pa.Table) -> None:
        """Take ``table``, the current rows followed by new ones, keeping the lookup indexes (extended)."""
        old = len(self)
        self._table, self.settings = table, mf.settings_of(table)
        for index, column in ((self._by_id, "id"), (self._by_patient, "patient")):
            if index is not None:
                index.extend(table.column(column), old)
        if self._held is not None:
            self._held = holders_of(Rows(table.slice(old)), self._held)

    # ---- queries ---------------------------------------------------------------------------------
    @property
    def manifest(self) -> pa.Table:
        """Committed rows only."""
        return self._table

    @property
    def rows(self) -> Rows:
        """Committed manifest rows as dicts, in manifest order, converted when read (do not modify)."""
        return Rows(self._table)

    def _position(self, sample_id: object) -> int | None:
        """The row number of ``sample_id``; None when absent."""
        if not isinstance(sample_id, str):
            return None
        if self._by_id is None:
            self._by_id = _Index(self._table.column("id"))
        return self._by_id.first(sample_id)

    def patient_split(self, patient: str) -> str | None:
        """The split of ``patient``'s committed volumes (all of a patient's volumes share one); None when new."""
        if self._by_patient is None:
            self._by_patient = _Index(self._table.column("patient"))
        position = self._by_patient.first(patient)
        return None if position is None else self._table.column("split")[position].as_py()

    def __contains__(self, sample_id: object) -> bool:
        return self._position(sample_id) is not None

    @property
    def grids(self) -> list[str]:
        return sorted(self._table.column("grid").unique().to_pylist())

    def __len__(self) -> int:
        return self._table.num_rows

    def row(self, sample_id: str) -> dict[str, Any]:
        """The manifest row of ``sample_id`` as a dict."""
        position = self._position(sample_id)
        if position is None:
            raise CorpusError(f"{self.manifest_path}: no sample {sample_id!r}")
        return self.rows[position]

    def column(self, name: str, sample_ids: Iterable[str]) -> list[Any]:
        """One manifest column's values for ``sample_ids`` (without making their rows into dicts)."""
        positions = []
        for sid in sample_ids:
            position = self._position(sid)
            if position is None:
                raise CorpusError(f"{self.manifest_path}: no sample {sid!r}")
            positions.append(position)
        return self._table.column(name).take(pa.array(positions, pa.int64())).to_pylist()

    def ids(
        self,
        split: str | None = None,
        label: str | None = None,
        label_fraction: float | None = None,
        require: Iterable[str] = (VOLUME_KEY,),
        raster_only: bool = True,
    ) -> list[str]:
        """Sample ids in manifest order that match every filter (``require`` may name ``"localizer"``)."""
        if split is not None and split not in mf.SPLITS:
            raise CorpusError(f"{self.path}: unknown split {split!r}; expected one of {mf.SPLITS}")
        patients: list[str] | None = None
        if label_fraction is not None:
            if label is None:
                raise CorpusError(f"{self.path}: label_fraction needs a label (ga or rpd)")
            if split not in (None, "train"):
                raise CorpusError(f"{self.path}: label fractions subset the train split, not {split!r}")
            split = "train"
            patients = self.label_fraction_patients(label, label_fraction)
        table = self._table
        keep = np.ones(table.num_rows, bool)
        if split is not None:
            keep &= _numpy(pc.equal(table.column("split"), split))
        for key in set(require) | ({label} if label else set()):
            keep &= self.holds(key)
        if raster_only:
            keep &= _numpy(table.column("raster"))
        if patients is not None:
            keep &= _numpy(pc.is_in(table.column("patient"), value_set=pa.array(patients, pa.string())))
        return self._table.column("id").filter(pa.array(keep)).to_pylist()

    def holds(self, key: str) -> np.ndarray:
        """Per row: whether it holds data for array ``key`` (an image, a mask or the localizer)."""
        if key == mf.LOCALIZER_KEY:
            return _numpy(self._table.column("localizer_grid").is_valid())
        found = np.zeros(self._table.num_rows, bool)
        for column in ("modalities", "labels"):
            lists = self._table.column(column).combine_chunks()
            hits = _numpy(pc.equal(pc.list_flatten(lists), key))
            found[pc.list_parent_indices(lists).to_numpy()[hits]] = True
        return found

    def holders(self) -> dict[str, dict[str, set[str]]]:
        """{split: {kind: patients}}: the patients whose raster volumes give each split a volume (``"oct"``) and
        each label (what :func:`octssl.corpus.layout.fill_splits` needs), from the columns, once; an append adds
        its own rows."""
        if self._held is not None:
            return self._held
        table = self._table
        raster = _numpy(table.column("raster")) if len(self) else np.zeros(0, bool)
        held: dict[str, dict[str, set[str]]] = {split: {} for split in mf.SPLITS}
        for split in mf.SPLITS:
            rows = raster & (_numpy(pc.equal(table.column("split"), split)) if len(self) else raster)
            for kind, mask in ((VOLUME_KEY, rows), *((label, rows & self.holds(label)) for label in mf.LABEL_KEYS)):
                patients = set(table.column("patient").filter(pa.array(mask)).unique().to_pylist()) if mask.any() else set()
                if patients:
                    held[split][kind] = patients
        self._held = held
        return held

    def label_fraction_patients(self, label: str, fraction: float) -> list[str]:
        """Nested, deterministic subset of the train patients having ``label``: round(f x n), at least 1
        (:func:`octssl.corpus.layout.label_fraction_patients`)."""
        train = _numpy(pc.equal(self._table.column("split"), "train")) if len(self) else np.zeros(0, bool)
        labelled = self.holds(label) & train
        patients = set(self._table.column("patient").filter(pa.array(labelled)).to_pylist())
        return label_fraction_patients(patients, label, fraction, self.settings["fraction_seed"], self.path)

    # ---- reading ---------------------------------------------------------------------------------
    def array(self, key: str, grid: str) -> zarr.Array:
        """The Zarr array ``<key>/<grid>`` (cached handle; CorpusError when missing)."""
        return self.backend.array(key, grid)

    slot = staticmethod(slot)

    def shard_file(self, key: str, grid: str, index: int) -> Path | Location:
        """Path of the shard file (or object) that holds slot ``index`` of ``<key>/<grid>``."""
        return self.backend.shard_file(key, grid, index)

    def read_array(self, key: str, row: dict[str, Any]) -> np.ndarray:
        """One stored array of one manifest row; CorpusError naming the file and sample on failure."""
        return self.backend.read_arrays([key], row)[key]

    def read(self, sample_id: str, *, verify: bool = False, localizer: bool = False) -> dict[str, Any]:
        """The sample dict of ``sample_id`` (uint8 arrays, ``meta`` from the manifest).

        ``verify=True`` also recomputes each array's sha256 (about halves the read rate).
        ``localizer=True`` adds the native-resolution localizer as ``sample["localizer"]`` ``(H, W)`` uint8
        (absent when the volume has none) and ``meta["localizer_spacing_mm"]`` (row, column mm) and
        ``meta["positions_mm"]`` (``(nB, 2, 2)`` float64; both None when unknown). Such a dict is not a
        training sample (``validate_sample`` rejects the extra key); the default read is one.
        """
        row = self.row(sample_id)
        keys = [*row["modalities"], *row["labels"]]
        if localizer and row["localizer_grid"] is not None:
            keys.append(mf.LOCALIZER_KEY)
        sample: dict[str, Any] = {"id": sample_id}
        for key, data in self.backend.read_arrays(keys, row).items():
            if verify and mf.array_sha256(data) != row["sha256"][key]:
                where = self.shard_file(key, *self.slot(key, row))
                raise CorpusError(f"{where}: sample {sample_id}: '{key}' checksum mismatch")
            sample[key] = data
        sample["meta"] = meta_of(row)
        if localizer:
            spacing, positions = row["localizer_spacing_mm"], row["positions_mm"]
            sample["meta"]["localizer_spacing_mm"] = None if spacing is None else tuple(spacing)
            sample["meta"]["positions_mm"] = None if positions is None else np.asarray(positions, np.float64)
        return sample

    # ---- writing ---------------------------------------------------------------------------------
    def append(self, samples: Iterable[dict[str, Any]], *, progress: bool = True,
               settings: dict[str, Any] | None = None) -> list[str]:
        """Append samples atomically: all of them commit, or the corpus stays as it was. Returns the ids.
        ``settings`` are merged into the corpus settings in the same commit (ingest records its key's
        fingerprint this way in a corpus that has none yet).

        The data goes into ``volumes.zarr`` under the undo journal; the rows are committed as one manifest
        part (``octssl.corpus.parts``), so an append writes its own rows, not the whole manifest."""
        with WriterLock(self.folder):
            journal = Journal(self.folder, self.folder / ZARR_NAME)
            committed = parts.read(self.folder, self._committed)  # only what changed since is read
            journal.recover(committed.token)
            if not committed.same_rows(self._committed):
                self._set_table(committed.table)
            self.backend.forget_arrays()
            token = journal.begin()
            try:
                writer = AppendWriter(self, journal, hook=self._hook)
                rows = writer.write_all(samples, progress=progress)
                self._hook("written")
                if not journal.owned():
                    raise CorpusError(f"{journal.dir}: the journal of this append was removed or replaced by "
                                      "another process; the append is abandoned, nothing was committed")
                changed = {**self.settings, **(settings or {})}
                if changed == self.settings:
                    committed = parts.commit(committed, mf.rows_table(rows, self.settings), token)
                else:  # new settings live in the base: one whole manifest (rare: once per corpus)
                    added = mf.rows_table(rows, self.settings).replace_schema_metadata(committed.table.schema.metadata)
                    committed = parts.rewrite(committed, pa.concat_tables([committed.table, added]),
                                              {**changed, "append_token": token})
            except BaseException:
                if journal.owned():  # never undo with another process's journal
                    journal.rollback()
                self.backend.forget_arrays()
                raise
            self._hook("committed")
            journal.finish()
            committed = parts.upkeep(committed)
        self._committed = committed
        self._grow(committed.table)
        self.backend.forget_arrays()
        return [row["id"] for row in rows]

    def attach(self, attachments: Iterable[Any]) -> int:
        """Write en-face images/masks (:class:`octssl.corpus.attach.Attachment`) into volumes already in the
        corpus, atomically and journalled like an append; every other array keeps its bytes. Returns the count.
        Rows change in place, so the whole manifest is written again (one new base)."""
        attachments = list(attachments)
        if not attachments:
            return 0
        with WriterLock(self.folder):
            journal = Journal(self.folder, self.folder / ZARR_NAME)
            committed = parts.read(self.folder, self._committed)
            journal.recover(committed.token)
            self._set_table(committed.table)
            token = journal.begin()
            try:
                rows = write_attachments(self, journal, attachments)
                record_provenance(self.folder, attachments)
                self._hook("written")
                committed = parts.rewrite(committed, mf.rows_table(rows, self.settings),
                                          {**self.settings, "append_token": token})
            except BaseException:
                journal.rollback()
                raise
            finally:
                self.backend.forget_arrays()
            self._hook("committed")
            journal.finish()
        self._committed = committed
        self._set_table(committed.table)
        return len(attachments)

    def _hook(self, stage: str) -> None:
        if Corpus.append_hook is not None:
            Corpus.append_hook(stage)

    # ---- checks ----------------------------------------------------------------------------------
    def verify(self, progress: bool = False) -> list[str]:
        """Every problem found (checksums, structure, orphans), each naming file and sample."""
        return verify_corpus(self, progress=progress)

    def summary(self) -> dict[str, Any]:
        """Counts per grid, split, modality and label; patients; raster reasons; bytes on disk."""
        return summarize(self)


def corpus_version(corpus: str | Path | Location) -> str:
    """The version of the corpus at ``corpus`` (a folder, a published corpus's URL or an icechunk repository),
    pinned to the byte, computed here only: the sha256 of its manifest.parquet (which holds every array's
    sha256, so equal digests mean equal data), folded with its parts' digests when appends left parts
    (``octssl.corpus.parts.version``); for an icechunk corpus the manifest stored in its snapshot."""
    where, snapshot = split_snapshot(corpus)
    if snapshot is not None or is_repository(where):
        return IcechunkBackend.at(where, snapshot).version()
    if where.remote:
        return ZarrBackend(where).version()
    return parts.version(where.local)


def _numpy(mask: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A boolean Arrow array as numpy (null counts as False)."""
    filled = pc.fill_null(mask, False)
    if isinstance(filled, pa.ChunkedArray):
        filled = filled.combine_chunks()
    return np.asarray(filled.to_numpy(zero_copy_only=False), bool)
