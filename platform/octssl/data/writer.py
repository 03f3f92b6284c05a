"""The data half of a corpus append: validate samples, buffer them per grid, write shard-sized slabs.

Volumes are buffered until a shard boundary so that each shard file is written once per append (Zarr
rewrites a whole shard whenever any chunk in it changes). Every array is registered with the undo journal
before it is first resized or written. The manifest rows are returned; the caller commits them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.storage import LocalStore

from octssl.data import manifest as mf
from octssl.data.journal import Journal
from octssl.errors import CorpusError, SampleError
from octssl.sample import ARRAY_KEYS, VOLUME_KEY

if TYPE_CHECKING:
    from octssl.data.corpus import Corpus

ZSTD_LEVEL = 3


class AppendWriter:
    """Writes one append's arrays into ``corpus``'s Zarr group under ``journal``."""

    def __init__(self, corpus: Corpus, journal: Journal) -> None:
        self.corpus = corpus
        self.journal = journal
        self.store = LocalStore(corpus.zarr_path)
        self.lengths: dict[str, int] = {}  # grid -> slots written so far (committed + this append)
        self.buffers: dict[str, list[dict[str, np.ndarray]]] = {}
        self.arrays: dict[str, zarr.Array] = {}
        self.shard_lens: dict[str, int] = {}  # grid -> volumes per oct shard

    def write_all(self, samples: Iterable[dict[str, Any]], progress: bool) -> list[dict[str, Any]]:
        from octssl.data.corpus import assign_split, prepared_sample

        corpus = self.corpus
        seen = set(corpus._row_of)
        split_of = {row["patient"]: row["split"] for row in corpus._rows}
        ratios = corpus.settings["split_ratios"]
        rows: list[dict[str, Any]] = []
        for sample in _progress(samples, progress):
            arrays, meta = prepared_sample(sample, str(corpus.path))
            sid = sample["id"]
            if sid in seen:
                raise SampleError(f"{corpus.path}: sample {sid}: id already in the corpus or this append")
            seen.add(sid)
            patient = str(meta["patient"])
            given = meta.get("split")
            if given and split_of.get(patient, given) != given:
                raise SampleError(f"{corpus.path}: sample {sid}: meta split {given!r} contradicts patient "
                                  f"{patient}'s split {split_of[patient]!r} (splits are per patient)")
            split = split_of.get(patient) or given or assign_split(patient, ratios)
            split_of[patient] = split
            grid = mf.grid_name(arrays[VOLUME_KEY].shape)
            rows.append(_row(sid, meta, arrays, split, grid, self.add(grid, arrays)))
        for grid in list(self.buffers):
            self.flush(grid)
        return rows

    def add(self, grid: str, arrays: dict[str, np.ndarray]) -> int:
        """Buffer one sample's arrays; returns its slot index in the grid's arrays."""
        if grid not in self.lengths:
            self.lengths[grid] = self._existing_length(grid)
            self.buffers[grid] = []
        buffer = self.buffers[grid]
        index = self.lengths[grid] + len(buffer)
        buffer.append(arrays)
        if grid not in self.shard_lens:
            self.shard_lens[grid] = self._shard_len(grid, VOLUME_KEY, arrays[VOLUME_KEY].nbytes)
        if (index + 1) % self.shard_lens[grid] == 0:
            self.flush(grid)
        return index

    def flush(self, grid: str) -> None:
        buffer = self.buffers[grid]
        if not buffer:
            return
        start = self.lengths[grid]
        stop = start + len(buffer)
        volume_shape = buffer[0][VOLUME_KEY].shape
        enface_shape = (volume_shape[0], volume_shape[2])
        targets = [(key, self._open_or_create(key, grid, volume_shape if key == VOLUME_KEY else enface_shape))
                   for key in ARRAY_KEYS]
        for key, arr in targets:  # journal first (a no-op for arrays this append created), then write
            self.journal.protect(f"{key}/{grid}", arr.shape[0], (arr.shards or arr.chunks)[0], exists=True)
        for key, arr in targets:
            arr.resize((stop, *arr.shape[1:]))
            present = [i for i, arrays in enumerate(buffer) if key in arrays]
            if not present:
                continue
            slab = np.zeros((len(buffer), *arr.shape[1:]), np.uint8)
            for i in present:
                slab[i] = buffer[i][key]
            arr[start:stop] = slab
        self.lengths[grid] = stop
        self.buffers[grid] = []
        self.corpus._hook("flushed")

    # ---- arrays ----------------------------------------------------------------------------------
    def _existing_length(self, grid: str) -> int:
        rows = [r for r in self.corpus._rows if r["grid"] == grid]
        committed = 1 + max((r["index"] for r in rows), default=-1)
        try:
            stored = self._open(VOLUME_KEY, grid).shape[0]
        except CorpusError:
            stored = 0
        # A longer array holds orphan slots (data without manifest rows): never overwrite them.
        return max(committed, stored)

    def _shard_len(self, grid: str, key: str, nbytes: int) -> int:
        from octssl.data.corpus import shard_length

        try:
            arr = self._open(key, grid)
            return (arr.shards or arr.chunks)[0]
        except CorpusError:
            return shard_length(nbytes, self.corpus.settings["shard_bytes"])

    def _open(self, key: str, grid: str) -> zarr.Array:
        name = f"{key}/{grid}"
        if name not in self.arrays:
            try:
                self.arrays[name] = zarr.open_array(self.store, path=name, mode="r+")
            except (FileNotFoundError, zarr.errors.NodeNotFoundError):
                raise CorpusError(f"{self.corpus.zarr_path / name}: array missing") from None
        return self.arrays[name]

    def _open_or_create(self, key: str, grid: str, shape: tuple[int, ...]) -> zarr.Array:
        from octssl.data.corpus import shard_length

        try:
            return self._open(key, grid)
        except CorpusError:
            pass
        name = f"{key}/{grid}"
        shard_len = shard_length(int(np.prod(shape)), self.corpus.settings["shard_bytes"])
        self.journal.protect(name, 0, shard_len, exists=False)  # recorded before it exists
        arr = zarr.create_array(
            self.store, name=name, shape=(0, *shape), dtype="uint8", chunks=(1, *shape),
            shards=(shard_len, *shape), compressors=ZstdCodec(level=ZSTD_LEVEL, checksum=True),
            fill_value=0, config={"write_empty_chunks": False},
        )
        self.arrays[name] = arr
        return arr


def _row(sid: str, meta: dict[str, Any], arrays: dict[str, np.ndarray], split: str, grid: str,
         index: int) -> dict[str, Any]:
    acquired = meta.get("acquired")
    if isinstance(acquired, str):
        acquired = dt.date.fromisoformat(acquired[:10])
    elif isinstance(acquired, dt.datetime):
        acquired = acquired.date()
    raster = bool(meta.get("raster", True))
    return {
        "id": sid,
        "patient": str(meta["patient"]),
        "eye": meta["eye"],
        "visit": int(meta["visit"]),
        "device": str(meta["device"]),
        "scan_pattern": str(meta["scan_pattern"]),
        "raster": raster,
        "raster_reason": None if raster else str(meta.get("raster_reason") or meta["scan_pattern"]),
        "shape": list(arrays[VOLUME_KEY].shape),
        "spacing_mm": meta["spacing_mm"],
        "modalities": [k for k in mf.IMAGE_KEYS if k in arrays],
        "labels": [k for k in mf.LABEL_KEYS if k in arrays],
        "split": split,
        "grid": grid,
        "index": index,
        "sha256": {k: (mf.array_sha256(arrays[k]) if k in arrays else None) for k in ARRAY_KEYS},
        "source": str(meta.get("source") or "unknown"),
        "acquired": acquired,
    }


def _progress(samples: Iterable[dict[str, Any]], enabled: bool) -> Iterable[dict[str, Any]]:
    if not enabled:
        yield from samples
        return
    from rich.progress import track

    total = len(samples) if hasattr(samples, "__len__") else None  # type: ignore[arg-type]
    yield from track(samples, description="appending volumes", total=total, transient=True)
