"""Corpus: create/open a manifest.parquet + volumes.zarr pair, append atomically, read samples, split.

Layout: ``volumes.zarr`` holds per grid bucket (volumes of one shape ``nBxDxW``) the arrays ``oct/<grid>``
``[N, nB, D, W]`` and ``faf|slo|ga|rpd/<grid>`` ``[N, nB, W]``, uint8, one volume per chunk, many chunks
per shard (sharding codec, ~256 MiB shards), zstd with a content checksum. A missing modality leaves the
fill value (0) in its slot and is absent from the row's ``modalities``/``labels``. A volume's optional
native-resolution localizer (SLO / fundus) lives in buckets of its own, ``localizer/<H>x<W>`` ``[N, H, W]``
(same chunking and codecs), found by the row's ``localizer_grid``/``localizer_index``; it is read only when
asked (``read(id, localizer=True)``), so the training sample dict never carries it. The manifest is the
commit point; see ``octssl.corpus.journal`` for how a crashed append is undone.

A corpus published to an object store (``octssl publish``) opens read-only from its URL
(``Corpus.open("s3://bucket/corpus")``): Zarr reads through an fsspec view of the pyarrow S3 filesystem,
the shard fast path (``octssl.corpus.chunkread``) through range requests.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import zarr
from zarr.core.sync import sync as zarr_sync
from zarr.storage import LocalStore

from octssl.corpus import manifest as mf
from octssl.corpus.chunkread import ChunkReader
from octssl.corpus.journal import Journal, WriterLock
from octssl.corpus.layout import ZARR_NAME, array_path, label_fraction_patients, meta_of, present, slot
from octssl.errors import CorpusError
from octssl.sample import VOLUME_KEY
from octssl.storage.location import Location, fsspec_async


class ArrayMetadataError(CorpusError):
    """An array's ``zarr.json`` exists but cannot be read (not UTF-8, not JSON, not Zarr metadata)."""


class Corpus:
    """One corpus directory. Readers see committed rows only; one writer appends at a time."""

    # Test seam: called with "flushed" (a shard slab written), "written" (all data written, manifest not yet
    # replaced) and "committed" (manifest replaced, journal not yet dropped); crash tests kill the process here.
    append_hook: ClassVar[Callable[[str], None] | None] = None

    def __init__(self, path: Path | Location, table: pa.Table) -> None:
        self.path = path
        self.remote = isinstance(path, Location) and path.remote  # read-only, on an object store
        self.manifest_path = path / mf.MANIFEST_NAME
        self.zarr_path = path / ZARR_NAME
        self._set_table(table)
        self._arrays: dict[str, zarr.Array] = {}
        self._chunks = ChunkReader()
        self._store: Any = None

    @property
    def folder(self) -> Path:
        """The corpus folder on this machine, what writers, locks and journals work in (a corpus published to
        an object store has none: it is read-only)."""
        if isinstance(self.path, Path):
            return self.path
        raise CorpusError(f"{self.path}: a published corpus is read-only; append locally and publish again")

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
    ) -> Corpus:
        """A new empty corpus at ``path`` (CorpusError if a corpus is already there). ``key_fingerprint``:
        the pseudonym key's fingerprint that later ingests must match (``octssl.ingest.phi``)."""
        path = Path(path)
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
            table = mf.empty_table(settings)
            mf.write_manifest(table, path / mf.MANIFEST_NAME)
        return cls(path, table)

    @classmethod
    def open(cls, path: str | Path | Location) -> Corpus:
        """Open a committed corpus (a folder, or a published corpus's URL, read-only); an interrupted append
        is undone first when no writer is active. An icechunk repository (``URL`` or ``URL@SNAPSHOT_ID``) opens
        read-only at that snapshot (``octssl.corpus.icechunk``)."""
        from octssl.corpus.icechunk import IcechunkCorpus, is_repository, split_snapshot

        where, snapshot = split_snapshot(path)
        if snapshot is not None or is_repository(where):
            return IcechunkCorpus.at(where, snapshot)
        if where.remote:  # the manifest is uploaded last: without it there is no corpus yet
            table = mf.read_manifest(where / mf.MANIFEST_NAME)
            if not (where / ZARR_NAME / "zarr.json").is_file():
                raise CorpusError(f"{where / ZARR_NAME}: missing (a published corpus needs manifest.parquet and volumes.zarr)")
            return cls(where, table)
        path = where.local
        if not path.is_dir():
            raise CorpusError(f"{path}: no corpus directory here")
        if not (path / ZARR_NAME / "zarr.json").is_file():
            raise CorpusError(f"{path / ZARR_NAME}: missing (a corpus needs manifest.parquet and volumes.zarr)")
        journal = Journal(path, path / ZARR_NAME)
        # Undo an interrupted append when no writer is active; a reader without write access reads the
        # committed rows as they are and leaves recovery to the next writer.
        if journal.pending and os.access(path, os.W_OK):
            lock = WriterLock(path)
            if lock.try_acquire():
                try:
                    journal.recover(mf.settings_of(mf.read_manifest(path / mf.MANIFEST_NAME))["append_token"])
                finally:
                    lock.release()
        return cls(path, mf.read_manifest(path / mf.MANIFEST_NAME))

    def _set_table(self, table: pa.Table) -> None:
        self._table = table
        self.settings = mf.settings_of(table)
        self._rows = table.to_pylist()
        self._row_of = {row["id"]: i for i, row in enumerate(self._rows)}

    # ---- queries ---------------------------------------------------------------------------------
    @property
    def manifest(self) -> pa.Table:
        """Committed rows only."""
        return self._table

    @property
    def rows(self) -> list[dict[str, Any]]:
        """Committed manifest rows as dicts, in manifest order (do not modify)."""
        return self._rows

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._row_of

    @property
    def grids(self) -> list[str]:
        return sorted({row["grid"] for row in self._rows})

    def __len__(self) -> int:
        return len(self._rows)

    def row(self, sample_id: str) -> dict[str, Any]:
        """The manifest row of ``sample_id`` as a dict."""
        try:
            return self._rows[self._row_of[sample_id]]
        except KeyError:
            raise CorpusError(f"{self.manifest_path}: no sample {sample_id!r}") from None

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
        patients: set[str] | None = None
        if label_fraction is not None:
            if label is None:
                raise CorpusError(f"{self.path}: label_fraction needs a label (ga or rpd)")
            if split not in (None, "train"):
                raise CorpusError(f"{self.path}: label fractions subset the train split, not {split!r}")
            split = "train"
            patients = set(self.label_fraction_patients(label, label_fraction))
        needed = set(require) | ({label} if label else set())
        return [
            row["id"]
            for row in self._rows
            if (split is None or row["split"] == split)
            and needed <= present(row)
            and (row["raster"] or not raster_only)
            and (patients is None or row["patient"] in patients)
        ]

    def label_fraction_patients(self, label: str, fraction: float) -> list[str]:
        """Nested, deterministic subset of the train patients having ``label``: round(f x n), at least 1
        (:func:`octssl.corpus.layout.label_fraction_patients`)."""
        return label_fraction_patients(self._rows, label, fraction, self.settings["fraction_seed"], self.path)

    # ---- reading ---------------------------------------------------------------------------------
    def array(self, key: str, grid: str) -> zarr.Array:
        """The Zarr array ``<key>/<grid>`` (cached handle; CorpusError when missing)."""
        name = array_path(key, grid)
        if name not in self._arrays:
            try:
                self._arrays[name] = zarr.open_array(self._zarr_store(), path=name)
            except (FileNotFoundError, zarr.errors.NodeNotFoundError) as err:
                raise CorpusError(f"{self.zarr_path / name}: array missing") from err
            except (ValueError, TypeError, KeyError) as err:  # undecodable or invalid JSON (a flipped byte)
                raise ArrayMetadataError(f"{self.zarr_path / name}/zarr.json: unreadable array metadata "
                                         f"({type(err).__name__}: {err})") from err
        return self._arrays[name]

    def _zarr_store(self) -> Any:
        """The read-only Zarr store of ``volumes.zarr`` (local, or an fsspec view of the object store)."""
        if self._store is None:
            if not self.remote:
                self._store = LocalStore(self.folder / ZARR_NAME, read_only=True)
            else:
                from zarr.storage import FsspecStore

                remote = Location.parse(self.zarr_path)
                self._store = FsspecStore(fsspec_async(remote), read_only=True, path=remote.path)
        return self._store

    slot = staticmethod(slot)

    def shard_file(self, key: str, grid: str, index: int) -> Path | Location:
        """Path of the shard file that holds slot ``index`` of ``<key>/<grid>``."""
        arr = self.array(key, grid)
        per_file = (arr.shards or arr.chunks)[0]  # a foreign unsharded array stores one chunk per file
        return self.zarr_path / array_path(key, grid) / "c" / str(index // per_file) / "/".join(
            ["0"] * (arr.ndim - 1)
        )

    def read_array(self, key: str, row: dict[str, Any]) -> np.ndarray:
        """One stored array of one manifest row; CorpusError naming the file and sample on failure."""
        return self._read_arrays([key], row)[key]

    def _stored(self, key: str, grid: str, index: int, row: dict[str, Any]) -> tuple[str, Any]:
        """(its path, the Zarr array) holding ``key`` of ``row`` at slot ``index``; CorpusError naming the
        array and sample when the array is missing or the slot lies beyond it."""
        where = f"{self.zarr_path}/{array_path(key, grid)}"  # a str: pathlib costs 5% of a small read
        try:
            arr = self.array(key, grid)
        except ArrayMetadataError as err:
            raise CorpusError(f"{err}: sample {row['id']}") from None
        except CorpusError:
            raise CorpusError(f"{where}: sample {row['id']}: array missing") from None
        if index >= arr.shape[0]:
            raise CorpusError(f"{where}: sample {row['id']}: manifest index {index} is beyond the "
                              f"array's {arr.shape[0]} volumes (row without data)")
        return where, arr

    def _read_arrays(self, keys: list[str], row: dict[str, Any]) -> dict[str, np.ndarray]:
        """Several arrays of one row: straight from the shard files where ``octssl.corpus.chunkread`` can
        (2.5-3.5x the read rate of 0.5-1 MiB volumes); the rest fetched concurrently in one trip through Zarr's
        event loop, which also gives every error (a separate trip per array costs a third of the rate)."""
        arrays, slots = [], [self.slot(key, row) for key in keys]
        requests: list[Any] = []
        for key, (grid, index) in zip(keys, slots, strict=True):
            where, arr = self._stored(key, grid, index, row)
            arrays.append(arr.async_array)
            requests.append((where, self._chunks.layout(where, arr), index))
        results = {key: data for key, data in zip(keys, self._chunks.read(requests), strict=True) if data is not None}
        for key, (where, layout, index), stored, (grid, _) in zip(keys, requests, arrays, slots, strict=True):
            if key not in results:  # Zarr would read a missing shard file as zeros: refuse that here
                path = layout.shard_path(where, index) if layout else str(self.shard_file(key, grid, index))
                self._check_shard_file(key, row, path, stored.shape[1:])

        async def fetch(chosen: list[int]) -> list[Any]:
            return await asyncio.gather(*(arrays[i].getitem(slots[i][1]) for i in chosen), return_exceptions=True)

        pending = [i for i, key in enumerate(keys) if key not in results]
        if pending:
            results.update(zip((keys[i] for i in pending), zarr_sync(fetch(pending)), strict=True))
        results = {key: results[key] for key in keys}  # errors and the sample dict in the caller's order
        failed = [k for k, r in results.items() if isinstance(r, Exception)]
        if failed:
            # Once more: a writer may have replaced the shard file between Zarr's index and chunk reads.
            results.update(zip(failed, zarr_sync(fetch([keys.index(k) for k in failed])), strict=True))
        for key, result in results.items():
            if isinstance(result, Exception):  # any codec failure means the stored bytes are damaged
                where = self.shard_file(key, *self.slot(key, row))
                raise CorpusError(f"{where}: sample {row['id']}: cannot decode '{key}': {result}") from result
        return results

    def _check_shard_file(self, key: str, row: dict[str, Any], path: str, slot_shape: tuple[int, ...]) -> None:
        """CorpusError unless the shard file holding ``key`` of ``row`` exists, or the row's data is all
        zeros (Zarr stores no chunk, and no file, for a slot that holds only the fill value)."""
        if self._chunks.shard_present(path) or row["sha256"].get(key) == mf.zeros_sha256(tuple(slot_shape)):
            return
        raise CorpusError(f"{path}: sample {row['id']}: shard file holding '{key}' is missing (deleted, or "
                          "never copied or synced); restore it from a backup or re-ingest (octssl verify lists "
                          "every volume affected)")

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
        for key, data in self._read_arrays(keys, row).items():
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
        fingerprint this way in a corpus that has none yet)."""
        from octssl.corpus.writer import AppendWriter

        if self.remote:
            raise CorpusError(f"{self.path}: a published corpus is read-only; append locally and publish again")
        with WriterLock(self.folder):
            journal = Journal(self.folder, self.folder / ZARR_NAME)
            journal.recover(mf.settings_of(mf.read_manifest(self.manifest_path))["append_token"])
            self._set_table(mf.read_manifest(self.manifest_path))
            self._arrays.clear()
            token = journal.begin()
            try:
                writer = AppendWriter(self, journal, hook=self._hook)
                rows = writer.write_all(samples, progress=progress)
                self._hook("written")
                if not journal.owned():
                    raise CorpusError(f"{journal.dir}: the journal of this append was removed or replaced by "
                                      "another process; the append is abandoned, nothing was committed")
                settings = {**self.settings, **(settings or {}), "append_token": token, "format": mf.FORMAT_VERSION}
                table = pa.concat_tables([self._table, mf.rows_table(rows, settings)]).replace_schema_metadata(
                    mf.with_settings(self._table.slice(0, 0), settings).schema.metadata
                )
                mf.write_manifest(table, self.folder / mf.MANIFEST_NAME)
            except BaseException:
                if journal.owned():  # never undo with another process's journal
                    journal.rollback()
                self._arrays.clear()
                raise
            self._hook("committed")
            journal.finish()
        self._set_table(table)
        self._arrays.clear()
        return [row["id"] for row in rows]

    def attach(self, attachments: Iterable[Any]) -> int:
        """Write en-face images/masks (:class:`octssl.corpus.attach.Attachment`) into volumes already in the
        corpus, atomically and journalled like an append; every other array keeps its bytes. Returns the count."""
        from octssl.corpus.attach import record_provenance, write_attachments

        attachments = list(attachments)
        if not attachments:
            return 0
        with WriterLock(self.folder):
            journal = Journal(self.folder, self.folder / ZARR_NAME)
            journal.recover(mf.settings_of(mf.read_manifest(self.manifest_path))["append_token"])
            self._set_table(mf.read_manifest(self.manifest_path))
            token = journal.begin()
            try:
                rows = write_attachments(self, journal, attachments)
                record_provenance(self.folder, attachments)
                self._hook("written")
                table = mf.rows_table(rows, {**self.settings, "append_token": token, "format": mf.FORMAT_VERSION})
                mf.write_manifest(table, self.folder / mf.MANIFEST_NAME)
            except BaseException:
                journal.rollback()
                raise
            finally:
                self._arrays.clear()
            self._hook("committed")
            journal.finish()
        self._set_table(table)
        return len(attachments)

    def _hook(self, stage: str) -> None:
        if Corpus.append_hook is not None:
            Corpus.append_hook(stage)

    # ---- checks ----------------------------------------------------------------------------------
    def verify(self, progress: bool = False) -> list[str]:
        """Every problem found (checksums, structure, orphans), each naming file and sample."""
        from octssl.corpus.audit import verify_corpus

        return verify_corpus(self, progress=progress)

    def summary(self) -> dict[str, Any]:
        """Counts per grid, split, modality and label; patients; raster reasons; bytes on disk."""
        from octssl.corpus.audit import summarize

        return summarize(self)


