"""The data half of a corpus append: validate samples, buffer them per grid, write shard-sized slabs.

Volumes are buffered until a shard boundary so that each shard file is written once per append (Zarr
rewrites a whole shard whenever any chunk in it changes). Every array is registered with the undo journal
before it is first resized or written. The manifest rows are returned; the caller commits them.

Two kinds of bucket, each with its own slots and shard boundaries: a volume grid ``nBxDxW`` (``oct`` and
the en-face arrays, one slot per volume) and a localizer grid ``HxW`` (``localizer``, one slot per volume
that has a native localizer; volumes of one grid may have localizers of several sizes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.storage import LocalStore

from octssl.corpus import manifest as mf
from octssl.corpus.journal import Journal
from octssl.corpus.layout import ZARR_NAME, assign_split, fill_splits, prepared_sample, shard_length, to_uint8
from octssl.errors import CorpusError, SampleError
from octssl.observe.progress import track
from octssl.sample import ARRAY_KEYS, VOLUME_KEY

if TYPE_CHECKING:
    from octssl.corpus.store import Corpus

ZSTD_LEVEL = 3
LOCALIZER = mf.LOCALIZER_KEY
#: The arrays of each kind of bucket, named by the array that sets its slots and shard boundaries.
BUCKET_KEYS = {VOLUME_KEY: ARRAY_KEYS, LOCALIZER: (LOCALIZER,)}
Bucket = tuple[str, str]  # (lead key, grid): ("oct", "49x128x512") or ("localizer", "768x768")


class AppendWriter:
    """Writes one append's arrays into ``corpus``'s Zarr group under ``journal``."""

    def __init__(self, corpus: Corpus, journal: Journal, hook: Callable[[str], None] = lambda stage: None) -> None:
        self.corpus = corpus
        self.hook = hook  # the corpus's crash-test seam, called after each slab
        self.journal = journal
        self.store = LocalStore(corpus.folder / ZARR_NAME)
        self.lengths: dict[Bucket, int] = {}  # slots written so far (committed + this append)
        self.buffers: dict[Bucket, list[dict[str, np.ndarray]]] = {}
        self.arrays: dict[str, zarr.Array] = {}
        self.shard_lens: dict[Bucket, int] = {}  # slots per shard of the bucket's lead array

    def write_all(self, samples: Iterable[dict[str, Any]], progress: bool) -> list[dict[str, Any]]:
        corpus = self.corpus
        seen = {row["id"] for row in corpus.rows}
        split_of = {row["patient"]: row["split"] for row in corpus.rows}
        ratios = corpus.settings["split_ratios"]
        rows: list[dict[str, Any]] = []
        hashed: set[str] = set()  # new patients whose split came from the hash (not given, not committed)
        for sample in track(samples, "appending volumes", progress):
            core = {k: v for k, v in sample.items() if k != LOCALIZER}  # the INTERFACES sample dict
            arrays, meta = prepared_sample(core, str(corpus.path))
            sid = sample["id"]
            localizer = prepared_localizer(sample, meta, f"{corpus.path}: sample {sid}")
            if sid in seen:
                raise SampleError(f"{corpus.path}: sample {sid}: id already in the corpus or this append")
            seen.add(sid)
            patient = str(meta["patient"])
            given = meta.get("split")
            if given and split_of.get(patient, given) != given:
                raise SampleError(f"{corpus.path}: sample {sid}: meta split {given!r} contradicts patient "
                                  f"{patient}'s split {split_of[patient]!r} (splits are per patient)")
            if patient not in split_of and not given:
                hashed.add(patient)
            split = split_of.get(patient) or given or assign_split(patient, ratios)
            split_of[patient] = split
            grid = mf.grid_name(arrays[VOLUME_KEY].shape)
            row = _row(sid, meta, arrays, split, grid, self.add((VOLUME_KEY, grid), arrays))
            if localizer is not None:
                loc_grid = mf.grid_name(localizer.shape)
                row.update(localizer_grid=loc_grid, localizer_index=self.add((LOCALIZER, loc_grid),
                                                                             {LOCALIZER: localizer}))
                row["sha256"][LOCALIZER] = mf.array_sha256(localizer)
            rows.append(row)
        fill_splits(corpus.rows, rows, hashed, ratios)
        for bucket in list(self.buffers):
            self.flush(bucket)
        return rows

    def add(self, bucket: Bucket, arrays: dict[str, np.ndarray]) -> int:
        """Buffer one sample's arrays of ``bucket``; returns its slot index in the bucket's arrays."""
        lead, grid = bucket
        if bucket not in self.lengths:
            self.lengths[bucket] = self._existing_length(bucket)
            self.buffers[bucket] = []
        buffer = self.buffers[bucket]
        index = self.lengths[bucket] + len(buffer)
        buffer.append(arrays)
        if bucket not in self.shard_lens:
            self.shard_lens[bucket] = self._shard_len(grid, lead, arrays[lead].nbytes)
        if (index + 1) % self.shard_lens[bucket] == 0:
            self.flush(bucket)
        return index

    def flush(self, bucket: Bucket) -> None:
        buffer = self.buffers[bucket]
        if not buffer:
            return
        lead, grid = bucket
        start = self.lengths[bucket]
        stop = start + len(buffer)
        lead_shape = buffer[0][lead].shape
        enface_shape = (lead_shape[0], lead_shape[-1])
        targets = [(key, self._open_or_create(key, grid, lead_shape if key == lead else enface_shape))
                   for key in BUCKET_KEYS[lead]]
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
        self.lengths[bucket] = stop
        self.buffers[bucket] = []
        self.hook("flushed")

    # ---- arrays ----------------------------------------------------------------------------------
    def _existing_length(self, bucket: Bucket) -> int:
        lead, grid = bucket
        grid_col, index_col = ("grid", "index") if lead == VOLUME_KEY else ("localizer_grid", "localizer_index")
        committed = 1 + max((r[index_col] for r in self.corpus.rows if r[grid_col] == grid), default=-1)
        try:
            stored = self._open(lead, grid).shape[0]
        except CorpusError:
            stored = 0
        # A longer array holds orphan slots (data without manifest rows): never overwrite them.
        return max(committed, stored)

    def _shard_len(self, grid: str, key: str, nbytes: int) -> int:
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
    acquired = meta.get("acquired")  # a date or None (checked by prepared_sample)
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
        "sha256": {k: (mf.array_sha256(arrays[k]) if k in arrays else None) for k in mf.STORED_KEYS},
        "source": str(meta.get("source") or "unknown"),
        "acquired": acquired,
        "localizer_grid": None,  # set by the caller when the sample has a localizer
        "localizer_index": None,
        "localizer_spacing_mm": meta.get("localizer_spacing_mm"),
        "positions_mm": meta.get("positions_mm"),
        "registration_problem": meta.get("registration_problem"),
        "native_shape": None if meta.get("native_shape") is None else "x".join(map(str, meta["native_shape"])),
        "upsampled": None if meta.get("native_shape") is None else
        any(int(g) > int(n) for g, n in zip(arrays[VOLUME_KEY].shape, meta["native_shape"], strict=True)),
    }


def prepared_localizer(sample: dict[str, Any], meta: dict[str, Any], at: str) -> np.ndarray | None:
    """The optional native localizer of a sample to append, as uint8 ``(H, W)``; checks and normalises its
    meta (``localizer_spacing_mm``: 2 positive numbers, ``positions_mm``: ``(nB, 2, 2)`` finite, each optional)
    in place. SampleError naming the sample when anything is off."""
    spacing, positions = meta.get("localizer_spacing_mm"), meta.get("positions_mm")
    if sample.get(LOCALIZER) is None:
        if spacing is not None or positions is not None:
            raise SampleError(f"{at}: meta 'localizer_spacing_mm'/'positions_mm' given without a 'localizer'")
        return None
    localizer = np.asarray(sample[LOCALIZER])
    if localizer.ndim != 2 or min(localizer.shape) < 1 or localizer.dtype not in (np.uint8, np.float32):
        raise SampleError(f"{at}: 'localizer' must be a (H, W) uint8 or float32 image, got "
                          f"{localizer.dtype}{localizer.shape}")
    if localizer.dtype == np.float32 and not np.isfinite(localizer).all():
        raise SampleError(f"{at}: 'localizer' contains NaN or inf")
    if spacing is not None:
        spacing = [float(v) for v in np.ravel(spacing)]
        if len(spacing) != 2 or not all(np.isfinite(v) and v > 0 for v in spacing):
            raise SampleError(f"{at}: meta 'localizer_spacing_mm' must be 2 positive numbers (row, column mm), "
                              f"got {meta['localizer_spacing_mm']}")
        meta["localizer_spacing_mm"] = spacing
    if positions is not None:
        array = np.asarray(positions, dtype=np.float64)
        expected = (np.shape(sample[VOLUME_KEY])[0], 2, 2)
        if array.shape != expected or not np.isfinite(array).all():
            raise SampleError(f"{at}: meta 'positions_mm' must be {expected} finite numbers (per B-scan "
                              f"[[start_x, start_y], [end_x, end_y]]), got shape {array.shape}")
        meta["positions_mm"] = array.tolist()
    return to_uint8(LOCALIZER, localizer, at)
