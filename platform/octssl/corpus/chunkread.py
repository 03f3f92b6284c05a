"""Fast reads of one slot of a sharded Zarr v3 array: one pread of its chunk via a cached shard index.

Why: zarr-python's sharding path costs a fixed ~0.4 ms per array read (event-loop trips, index and codec
pipelines) on top of decoding, and a sample has up to six arrays (oct, faf, slo, ga, rpd, localizer), most of
them a few KiB. For arrays whose layout this module understands (zarr-python's own metadata, see
``layout_of``) a read is: open the shard file, look its index up in a cache keyed by the file's
(inode, mtime_ns, size) (so a shard rewritten by an append is re-read), pread the chunk's byte range from the
same descriptor (writers replace shard files atomically, so index and chunk come from one version) into a
reused buffer, check a crc32c when the chain has one, zstd-decode into the output array; a sample's arrays
are read concurrently (``ChunkReader.read``). Everything else (another codec chain, a
missing shard file, any I/O or decode failure) returns None and the caller takes the Zarr path, which gives
the same arrays and raises the errors; a missing chunk inside a shard is the fill value, as in Zarr. Zarr
also reads a missing shard *file* as the fill value, so ``shard_present`` tells the caller whether one is
there (checked once per file, and again whenever this reader finds it gone).
A corpus on an object store (``s3://...``, read-only) is read the same way with range requests: one for the
shard index (cached per object; published objects are never rewritten), one per chunk.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr
from numcodecs.zstd import Zstd
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.metadata import ArrayV3Metadata

from octssl.storage.location import Location, is_url

EMPTY = 2**64 - 1  # offset and length of a chunk a shard does not hold (zarr v3 sharding spec)
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
INDEX_CACHE = 512  # shard indexes kept per reader (at most 16 KiB each for 1024-chunk shards)
HELPER_THREADS = 8  # a sample has at most 6 arrays (the calling thread reads the largest); a crop's range requests


@dataclass(frozen=True)
class ShardLayout:
    """What a reader needs to find and decode one slot (index along axis 0) of a sharded array."""

    slots_per_shard: int
    slots_per_chunk: int
    chunks_per_shard: int
    slot_shape: tuple[int, ...]
    dtype: np.dtype
    fill_value: object
    index_at_end: bool
    index_crc: bool
    steps: tuple[str, ...]  # bytes-to-bytes codecs in encoding order: "zstd" and/or "crc32c"
    chunk_key: str  # shard file path under the array, "{}" standing for the shard number ("c/{}/0/0/0")

    @property
    def index_nbytes(self) -> int:
        return 16 * self.chunks_per_shard + (4 if self.index_crc else 0)

    def shard_path(self, array_dir: str | Path, slot: int) -> str:
        return f"{array_dir}/{self.chunk_key.format(slot // self.slots_per_shard)}"  # str: pathlib costs 5%


def layout_of(arr: zarr.Array) -> ShardLayout | None:
    """The layout of ``arr`` when this module can read it (else None): a regular grid sharded along axis 0
    only, the sharding codec alone, inner codecs ``bytes`` then optional ``zstd`` and ``crc32c``, index
    codecs ``bytes`` (little endian) and optional ``crc32c``, a native-endian numeric dtype."""
    found = _sharded(arr)
    if found is None:
        return None
    shape, shard, inner, codecs = found
    if len(shape) < 1 or shard[1:] != shape[1:] or inner[1:] != shape[1:] or shard[0] % inner[0]:
        return None
    return ShardLayout(slots_per_shard=shard[0], slots_per_chunk=inner[0], chunks_per_shard=shard[0] // inner[0],
                       slot_shape=shape[1:], **codecs)


def _sharded(arr: zarr.Array) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], dict[str, Any]] | None:
    """(shape, shard shape, chunk shape, the ShardLayout fields of its codecs) of a sharded array whose codecs
    this module decodes (see ``layout_of``); None for any other array."""
    meta = arr.metadata
    if not isinstance(meta, ArrayV3Metadata) or meta.storage_transformers or len(meta.codecs) != 1:
        return None
    sharding, grid = meta.codecs[0], meta.chunk_grid
    if not isinstance(sharding, ShardingCodec) or not isinstance(grid, RegularChunkGrid):
        return None
    dtype = np.dtype(arr.dtype)
    if dtype.kind not in "biuf" or not dtype.isnative:
        return None
    first, *rest = sharding.codecs
    endian = getattr(first, "endian", None)
    native = "little" if sys.byteorder == "little" else "big"
    if not isinstance(first, BytesCodec) or (dtype.itemsize > 1 and getattr(endian, "value", endian) != native):
        return None
    names = {ZstdCodec: "zstd", Crc32cCodec: "crc32c"}
    steps = tuple(names.get(type(codec), "") for codec in rest)
    if "" in steps or steps.count("zstd") > 1:
        return None
    index_first, *index_rest = sharding.index_codecs
    index_endian = getattr(getattr(index_first, "endian", None), "value", None)
    if not isinstance(index_first, BytesCodec) or index_endian != "little" or len(index_rest) > 1:
        return None
    if index_rest and not isinstance(index_rest[0], Crc32cCodec):
        return None
    fill = meta.fill_value
    if fill is None or not np.isfinite(fill):
        return None
    shape = tuple(meta.shape)
    marker = 987654321  # a shard number no other part of the key can contain
    key = meta.encode_chunk_key((marker,) + (0,) * (len(shape) - 1))
    if key.count(str(marker)) != 1 or "{" in key or "}" in key:
        return None
    codecs = {"dtype": dtype, "fill_value": fill, "index_at_end": sharding.index_location.value == "end",
              "index_crc": bool(index_rest), "steps": steps, "chunk_key": key.replace(str(marker), "{}")}
    return shape, tuple(grid.chunk_shape), tuple(sharding.chunk_shape), codecs


@dataclass(frozen=True)
class RegionLayout(ShardLayout):
    """A volume array in sub-volume chunks: each slot ``(nB, D, W)`` is ``grid`` = (B-scan, A-scan) chunks of
    ``slot_shape`` = ``(cb, D, cw)`` (so ``_decode`` sees one chunk as one slot), and a shard holds whole slots."""

    volume_shape: tuple[int, ...] = ()
    grid: tuple[int, int] = (1, 1)


def region_layout_of(arr: zarr.Array) -> RegionLayout | None:
    """The layout of a volume array ``(N, nB, D, W)`` stored in sub-volume chunks ``(1, cb, D, cw)`` (shards of
    whole volumes, ``octssl.corpus.layout.volume_chunking``) with the codecs ``layout_of`` reads; else None."""
    found = _sharded(arr)
    if found is None or arr.ndim != 4:
        return None
    shape, shard, inner, codecs = found
    if inner[0] != 1 or shard[2] != shape[2] or inner[2] != shape[2] or shard[1] % inner[1] or shard[3] % inner[3] \
            or not 0 <= shard[1] - shape[1] < inner[1] or not 0 <= shard[3] - shape[3] < inner[3]:
        return None
    per_slot = (shard[1] // inner[1], shard[3] // inner[3])
    return RegionLayout(slots_per_shard=shard[0], slots_per_chunk=1, slot_shape=inner[1:],
                        chunks_per_shard=shard[0] * per_slot[0] * per_slot[1], volume_shape=shape[1:], grid=per_slot,
                        **codecs)


@dataclass(frozen=True)
class _Chunk:
    """One chunk to read: the shard file's open descriptor (or remote file), its byte range, the slot within it."""

    fd: Any
    offset: int
    length: int
    within: int


class ChunkReader:
    """Reads slots of sharded arrays straight from their shard files; keeps shard indexes and layouts.

    ``served`` and ``declined`` count reads answered here and reads left to the caller's Zarr path.
    """

    def __init__(self, max_indexes: int = INDEX_CACHE) -> None:
        self._indexes: OrderedDict[str, tuple[tuple[int, int, int], np.ndarray]] = OrderedDict()
        self._layouts: dict[str, tuple[zarr.Array, ShardLayout | None]] = {}
        self._present: set[str] = set()  # shard files seen to exist (a read that finds one gone drops it)
        self._zstd = Zstd()
        self._lock = threading.Lock()  # the caches may be shared by a caller's threads
        self._local = threading.local()  # per thread: the buffer chunk bytes are read into
        self._executor: ThreadPoolExecutor | None = None
        self._executor_pid = 0
        self.max_indexes = max_indexes
        self.served = 0
        self.declined = 0

    def __getstate__(self) -> dict[str, int]:
        return {"max_indexes": self.max_indexes}  # caches, locks and threads stay with this process

    def __setstate__(self, state: dict[str, int]) -> None:
        self.__init__(state["max_indexes"])  # type: ignore[misc]

    def layout(self, name: str, arr: zarr.Array) -> ShardLayout | None:
        """``layout_of(arr)``, computed once per array handle (a reopened handle is looked at again)."""
        cached = self._layouts.get(name)
        if cached is None or cached[0] is not arr:
            cached = self._layouts[name] = (arr, layout_of(arr))
        return cached[1]

    def shard_present(self, path: str) -> bool:
        """Whether the shard file ``path`` exists: a stat the first time, a set lookup after that."""
        if path in self._present:
            return True
        if not (Location.parse(path).is_file() if is_url(path) else os.path.isfile(path)):
            return False
        with self._lock:
            self._present.add(path)
        return True

    def read(self, requests: list[tuple[str | Path, ShardLayout | None, int]]) -> list[np.ndarray | None]:
        """Slots of arrays, each request ``(array_dir, layout, slot)``; None where the caller must use Zarr.

        The largest chunk is read and decoded in the calling thread, the others by helper threads meanwhile
        (pread and zstd release the GIL): on a cold page cache this overlaps the disk waits of a sample's
        small en-face arrays with the volume (about 20% faster; no change on a warm cache).
        """
        located = [None if layout is None else self._locate(array_dir, layout, slot)
                   for array_dir, layout, slot in requests]
        results: list[np.ndarray | None] = [None if isinstance(spot, _Chunk) else spot for spot in located]
        chunks = [i for i, spot in enumerate(located) if isinstance(spot, _Chunk)]
        helpers: dict[int, Future] = {}
        try:
            if chunks:
                main = max(chunks, key=lambda i: located[i].length)  # type: ignore[union-attr]
                helpers = {i: self._pool().submit(self._fetch, located[i], requests[i][1])  # type: ignore[arg-type]
                           for i in chunks if i != main}
                results[main] = self._fetch(located[main], requests[main][1])  # type: ignore[arg-type]
                for i, future in helpers.items():
                    results[i] = future.result()
        finally:
            wait(helpers.values())  # no descriptor is closed while a helper may still read it
            for i in chunks:
                _close(located[i].fd)  # type: ignore[union-attr]
        declined = sum(r is None for r in results)
        self.declined += declined
        self.served += len(results) - declined
        return results

    def read_region(self, array_dir: str | Path, layout: RegionLayout, slot: int, bscans: tuple[int, int],
                    ascans: tuple[int, int]) -> np.ndarray | None:
        """``[bscans, :, ascans]`` of slot ``slot`` of a volume array in sub-volume chunks: one cached shard
        index, then only the chunks the region overlaps (runs of adjacent chunks in one read; on an object
        store one range request per run, all in flight at once). None where the caller must use Zarr."""
        path = layout.shard_path(array_dir, slot)
        try:
            fd, version = _open(path)
        except OSError:
            self._present.discard(path)
            return None
        try:
            region = self._region(fd, path, version, layout, slot, bscans, ascans)
        except (OSError, ValueError):
            region = None
        finally:
            _close(fd)
        self.served += region is not None
        self.declined += region is None
        return region

    def _region(self, fd: Any, path: str, version: tuple[int, int, int], layout: RegionLayout, slot: int,
                bscans: tuple[int, int], ascans: tuple[int, int]) -> np.ndarray | None:
        entries = self._index(fd, path, version, layout)
        if entries is None:
            return None
        (b0, b1), (w0, w1) = bscans, ascans
        cb, depth, cw = layout.slot_shape
        out = np.empty((b1 - b0, depth, w1 - w0), layout.dtype)
        first = (slot % layout.slots_per_shard) * layout.grid[0] * layout.grid[1]
        wanted = []  # (offset, length, bi, wi) of each stored chunk the region overlaps
        for bi in range(b0 // cb, (b1 - 1) // cb + 1):
            for wi in range(w0 // cw, (w1 - 1) // cw + 1):
                offset, length = (int(v) for v in entries[first + bi * layout.grid[1] + wi])
                if offset == EMPTY and length == EMPTY:
                    self._place(out, np.full(layout.slot_shape, layout.fill_value, layout.dtype), bi, wi, layout,
                                bscans, ascans)
                elif offset + length > version[2]:
                    return None
                else:
                    wanted.append((offset, length, bi, wi))
        runs = _runs(sorted(wanted))

        def fetch(run: tuple[int, int, Any]) -> bytes:
            return _pread(fd, run[1] - run[0], run[0])

        blobs = list(self._pool().map(fetch, runs)) if not isinstance(fd, int) else [fetch(run) for run in runs]
        for (start, stop, members), blob in zip(runs, blobs, strict=True):
            if len(blob) != stop - start:
                return None
            for offset, length, bi, wi in members:
                chunk = self._decode(memoryview(blob)[offset - start:offset - start + length], layout)
                if chunk is None:
                    return None
                self._place(out, chunk.reshape(layout.slot_shape), bi, wi, layout, bscans, ascans)
        return out

    @staticmethod
    def _place(out: np.ndarray, chunk: np.ndarray, bi: int, wi: int, layout: RegionLayout, bscans: tuple[int, int],
               ascans: tuple[int, int]) -> None:
        """Copy the part of chunk (bi, wi) inside the region into ``out``."""
        cb, _, cw = layout.slot_shape
        lo_b, hi_b = max(bscans[0], bi * cb), min(bscans[1], (bi + 1) * cb)
        lo_w, hi_w = max(ascans[0], wi * cw), min(ascans[1], (wi + 1) * cw)
        out[lo_b - bscans[0]:hi_b - bscans[0], :, lo_w - ascans[0]:hi_w - ascans[0]] = \
            chunk[lo_b - bi * cb:hi_b - bi * cb, :, lo_w - wi * cw:hi_w - wi * cw]

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None or self._executor_pid != os.getpid():  # threads do not survive a fork
            self._executor = ThreadPoolExecutor(HELPER_THREADS, thread_name_prefix="octssl-chunkread")
            self._executor_pid = os.getpid()
        return self._executor

    def _locate(self, array_dir: str | Path, layout: ShardLayout, slot: int) -> _Chunk | np.ndarray | None:
        """Where slot ``slot``'s chunk lies (an open descriptor and a byte range), the fill value when the
        shard holds no such chunk, or None (no shard file, a bad index)."""
        path = layout.shard_path(array_dir, slot)
        try:
            fd, version = _open(path)
        except OSError:
            self._present.discard(path)  # gone (or unreadable): the caller checks again before Zarr
            return None
        try:
            entries = self._index(fd, path, version, layout)
        except (OSError, ValueError):
            entries = None
        chunk, within = divmod(slot % layout.slots_per_shard, layout.slots_per_chunk)
        offset, length = (-1, -1) if entries is None else (int(v) for v in entries[chunk])
        if offset == EMPTY and length == EMPTY:
            _close(fd)
            return np.full(layout.slot_shape, layout.fill_value, layout.dtype)
        if entries is None or offset + length > version[2]:
            _close(fd)
            return None
        return _Chunk(fd, offset, length, within)

    def _fetch(self, spot: _Chunk, layout: ShardLayout) -> np.ndarray | None:
        buffer = getattr(self._local, "buffer", None)
        if buffer is None or len(buffer) < spot.length:
            # Reused: a fresh bytes object per read (os.pread) costs page faults that halve the rate of ~1 MB chunks.
            buffer = self._local.buffer = bytearray(max(spot.length, 1 << 20))
        raw = memoryview(buffer)[:spot.length]
        try:
            got = _pread_into(spot.fd, raw, spot.offset)
        except OSError:
            return None
        decoded = self._decode(raw, layout) if got == spot.length else None
        if decoded is None:
            return None
        volume = decoded.reshape(layout.slots_per_chunk, *layout.slot_shape)
        return volume[0] if layout.slots_per_chunk == 1 else volume[spot.within].copy()

    def _index(self, fd: Any, path: str, version: tuple[int, int, int], layout: ShardLayout) -> np.ndarray | None:
        """The (chunks, 2) offsets and lengths of the shard file open at ``fd``, cached per file version."""
        with self._lock:
            cached = self._indexes.get(path)
            if cached is not None and cached[0] == version:
                self._indexes.move_to_end(path)
                return cached[1]
        size, nbytes = version[2], layout.index_nbytes
        if size < nbytes:
            return None
        raw = _pread(fd, nbytes, size - nbytes if layout.index_at_end else 0)
        if len(raw) != nbytes or (layout.index_crc and not _crc_ok(raw)):
            return None
        entries = np.frombuffer(raw, "<u8", count=2 * layout.chunks_per_shard).reshape(-1, 2)
        with self._lock:
            self._indexes[path] = (version, entries)
            while len(self._indexes) > self.max_indexes:
                self._indexes.popitem(last=False)
        return entries

    def _decode(self, raw: memoryview, layout: ShardLayout) -> np.ndarray | None:
        """Undo the bytes-to-bytes codecs (last applied first); None when the bytes do not check out."""
        expected = layout.slots_per_chunk * int(np.prod(layout.slot_shape)) * layout.dtype.itemsize
        data: bytes | memoryview = raw
        try:
            for position in range(len(layout.steps) - 1, -1, -1):
                if layout.steps[position] == "crc32c":
                    if not _crc_ok(data):
                        return None
                    data = memoryview(data)[:-4]
                elif position == 0:  # the last step to undo: decode straight into the output array
                    if _zstd_content_size(data) != expected:
                        return None
                    out = np.empty(expected, np.uint8)
                    self._zstd.decode(data, out=out)
                    return out.view(layout.dtype)
                else:
                    data = self._zstd.decode(data)
        except Exception:  # any decode failure: the Zarr path decodes again and raises the specific error
            return None
        if len(data) != expected:
            return None
        return np.frombuffer(data, np.uint8).copy().view(layout.dtype)


def _runs(chunks: list[tuple[int, int, int, int]]) -> list[tuple[int, int, list[tuple[int, int, int, int]]]]:
    """Chunks (sorted by offset) grouped into runs of adjacent byte ranges: (start, stop, chunks) per run.
    Zarr lays a shard's chunks out in Morton order, so a region's chunks are adjacent only in part."""
    runs: list[tuple[int, int, list[tuple[int, int, int, int]]]] = []
    for chunk in chunks:
        offset, length = chunk[0], chunk[1]
        if runs and offset == runs[-1][1]:
            runs[-1] = (runs[-1][0], offset + length, [*runs[-1][2], chunk])
        else:
            runs.append((offset, offset + length, [chunk]))
    return runs


def _open(path: str) -> tuple[Any, tuple[int, int, int]]:
    """An open shard file (a descriptor, or a remote file for a URL) and its (inode, mtime_ns, size)."""
    if is_url(path):
        where = Location.parse(path)  # published objects are never rewritten: the size is the version
        handle = where.fs.open_input_file(where.path)
        return handle, (0, 0, handle.size())
    fd = os.open(path, os.O_RDONLY)
    stat = os.fstat(fd)
    return fd, (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def _pread(fd: Any, count: int, offset: int) -> bytes:
    return os.pread(fd, count, offset) if isinstance(fd, int) else fd.read_at(count, offset)


def _pread_into(fd: Any, buffer: memoryview, offset: int) -> int:
    if isinstance(fd, int):
        return os.preadv(fd, [buffer], offset)
    data = fd.read_at(len(buffer), offset)  # one range request
    buffer[:len(data)] = data
    return len(data)


def _close(fd: Any) -> None:
    if isinstance(fd, int):
        os.close(fd)
    else:
        fd.close()


def _crc_ok(data: bytes | memoryview) -> bool:
    """Whether the last 4 bytes of ``data`` are the little-endian crc32c of the rest."""
    if len(data) < 4:
        return False
    body = np.frombuffer(data, np.uint8)
    return google_crc32c.value(body[:-4]) == int.from_bytes(bytes(body[-4:]), "little")


def _zstd_content_size(frame: bytes | memoryview) -> int | None:
    """Decompressed size declared in a zstd frame header (RFC 8878, 3.1.1.1); None when it declares none."""
    if len(frame) < 6 or bytes(frame[:4]) != ZSTD_MAGIC:
        return None
    descriptor = frame[4]
    size_flag, single_segment = descriptor >> 6, (descriptor >> 5) & 1
    start = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[descriptor & 3]
    width = (1 if single_segment else 0, 2, 4, 8)[size_flag]
    if width == 0 or len(frame) < start + width:
        return None
    value = int.from_bytes(bytes(frame[start:start + width]), "little")
    return value + 256 if width == 2 else value
