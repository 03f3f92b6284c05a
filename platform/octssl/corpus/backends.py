"""Where a corpus's arrays are read from: its backends. The corpus interface (:class:`octssl.corpus.store.Corpus`)
holds the manifest rows and asks its backend for arrays; ``Corpus.open`` picks the backend.

:class:`ZarrBackend` reads ``volumes.zarr`` of a corpus folder, or of a corpus published to an object store
(read-only, an fsspec view of the pyarrow S3 filesystem), through Zarr and the shard fast path
(``octssl.corpus.chunkread``, range requests on an object store). The icechunk backend
(``octssl.corpus.repository``) reads one object per array from an icechunk snapshot.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync as zarr_sync
from zarr.storage import FsspecStore, LocalStore

from octssl.corpus import manifest as mf
from octssl.corpus import parts
from octssl.corpus.chunkread import ChunkReader
from octssl.corpus.layout import ZARR_NAME, array_path, slot
from octssl.errors import CorpusError
from octssl.storage.location import Location, fsspec_async


class ArrayMetadataError(CorpusError):
    """An array's ``zarr.json`` exists but cannot be read (not UTF-8, not JSON, not Zarr metadata)."""


class ZarrBackend:
    """A corpus folder (``path`` a Path) or a published corpus (``path`` an object-store Location, read-only)."""

    snapshot_id: str | None = None  # an icechunk snapshot's id; None for a folder or a published corpus

    def __init__(self, path: Path | Location) -> None:
        self.path = path
        self.read_only = isinstance(path, Location) and path.remote  # on an object store
        self.manifest_path = path / mf.MANIFEST_NAME
        self.zarr_path = path / ZARR_NAME
        self._arrays: dict[str, zarr.Array] = {}
        self.chunks = ChunkReader()  # the shard fast path (its counters: reads served, declined)
        self._store: Any = None

    def forget_arrays(self) -> None:
        """Drop the cached array handles (a writer changed their shapes)."""
        self._arrays.clear()

    def version(self) -> str:
        """The corpus version (see :func:`octssl.corpus.store.corpus_version`)."""
        if isinstance(self.path, Path):
            return parts.version(self.path)
        try:
            return hashlib.sha256(self.manifest_path.read_bytes()).hexdigest()
        except FileNotFoundError:
            raise CorpusError(f"{self.manifest_path}: manifest is missing (not an octssl corpus, or it was never "
                              "committed)") from None

    def storage_root(self) -> Location:
        """Where every byte of the corpus lives (``octssl info`` counts them)."""
        return Location.parse(self.path)

    def stored_grids(self, key: str) -> list[str]:
        """The grid buckets that hold an array ``key`` (also those no manifest row refers to)."""
        if self.read_only:  # a published corpus: the buckets are the prefixes holding a zarr.json
            prefix = Location.parse(self.zarr_path / key)
            return sorted({f.parent.name for f in prefix.files() if f.name == "zarr.json" and f.parent.parent == prefix})
        root = Path(self.zarr_path) / key
        return [p.name for p in root.iterdir() if (p / "zarr.json").is_file()] if root.is_dir() else []

    def has_array(self, key: str, grid: str) -> bool:
        return (self.zarr_path / key / grid / "zarr.json").is_file()

    def array(self, key: str, grid: str) -> zarr.Array:
        """The Zarr array ``<key>/<grid>`` (cached handle; CorpusError when missing)."""
        name = array_path(key, grid)
        if name not in self._arrays:
            try:
                self._arrays[name] = zarr.open_array(self.zarr_store(), path=name)
            except (FileNotFoundError, zarr.errors.NodeNotFoundError) as err:
                raise CorpusError(f"{self.zarr_path / name}: array missing") from err
            except (ValueError, TypeError, KeyError) as err:  # undecodable or invalid JSON (a flipped byte)
                raise ArrayMetadataError(f"{self.zarr_path / name}/zarr.json: unreadable array metadata "
                                         f"({type(err).__name__}: {err})") from err
        return self._arrays[name]

    def zarr_store(self) -> Any:
        """The read-only Zarr store of ``volumes.zarr`` (local, or an fsspec view of the object store)."""
        if self._store is None:
            if not self.read_only:
                self._store = LocalStore(Path(self.zarr_path), read_only=True)
            else:
                remote = Location.parse(self.zarr_path)
                self._store = FsspecStore(fsspec_async(remote), read_only=True, path=remote.path)
        return self._store

    def shard_file(self, key: str, grid: str, index: int) -> Path | Location:
        """Path of the shard file that holds slot ``index`` of ``<key>/<grid>``."""
        arr = self.array(key, grid)
        per_file = (arr.shards or arr.chunks)[0]  # a foreign unsharded array stores one chunk per file
        return self.zarr_path / array_path(key, grid) / "c" / str(index // per_file) / "/".join(
            ["0"] * (arr.ndim - 1)
        )

    def stored(self, key: str, grid: str, index: int, row: dict[str, Any]) -> tuple[str, Any]:
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

    def read_arrays(self, keys: list[str], row: dict[str, Any]) -> dict[str, np.ndarray]:
        """Several arrays of one row: straight from the shard files where ``octssl.corpus.chunkread`` can
        (2.5-3.5x the read rate of 0.5-1 MiB volumes); the rest fetched concurrently in one trip through Zarr's
        event loop, which also gives every error (a separate trip per array costs a third of the rate)."""
        arrays, slots = [], [slot(key, row) for key in keys]
        requests: list[Any] = []
        for key, (grid, index) in zip(keys, slots, strict=True):
            where, arr = self.stored(key, grid, index, row)
            arrays.append(arr.async_array)
            requests.append((where, self.chunks.layout(where, arr), index))
        results = {key: data for key, data in zip(keys, self.chunks.read(requests), strict=True) if data is not None}
        for key, (where, layout, index), stored, (grid, _) in zip(keys, requests, arrays, slots, strict=True):
            if key not in results:  # Zarr would read a missing shard file as zeros: refuse that here
                path = layout.shard_path(where, index) if layout else str(self.shard_file(key, grid, index))
                self.check_shard_file(key, row, path, stored.shape[1:])

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
                where = self.shard_file(key, *slot(key, row))
                raise CorpusError(f"{where}: sample {row['id']}: cannot decode '{key}': {result}") from result
        return results

    def check_shard_file(self, key: str, row: dict[str, Any], path: str, slot_shape: tuple[int, ...]) -> None:
        """CorpusError unless the shard file holding ``key`` of ``row`` exists, or the row's data is all
        zeros (Zarr stores no chunk, and no file, for a slot that holds only the fill value)."""
        if self.chunks.shard_present(path) or row["sha256"].get(key) == mf.zeros_sha256(tuple(slot_shape)):
            return
        raise CorpusError(f"{path}: sample {row['id']}: shard file holding '{key}' is missing (deleted, or "
                          "never copied or synced); restore it from a backup or re-ingest (octssl verify lists "
                          "every volume affected)")
