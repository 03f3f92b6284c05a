"""A training crop of a stored volume, read from only the chunks it overlaps.

Large OCT volumes are stored in sub-volume chunks (``octssl.corpus.layout.volume_chunking``): a crop of
B-scans x A-scans at full depth reads the shard's index (cached) and the chunks the region overlaps,
nothing else (``ChunkReader.read_region``; on an object store range requests, in flight together). A volume stored as one chunk
(small grids, corpora written before sub-volume chunks) is read whole through the corpus's fast path and
cut, as before. The en-face arrays (a few KiB per volume) are always read whole: the transform crops them.
"""

from __future__ import annotations

import os
from typing import Any

from octssl.corpus import manifest as mf
from octssl.corpus.chunkread import ChunkReader, RegionLayout, region_layout_of
from octssl.corpus.layout import meta_of
from octssl.errors import CorpusError
from octssl.sample import VOLUME_KEY
from octssl.storage.location import Location, is_url

_reader = ChunkReader()  # this process's shard fast path for crops (caches shard indexes)
_layouts: dict[str, tuple[Any, RegionLayout | None]] = {}  # per array: its handle and layout


def read_crop(corpus: Any, sample_id: str, bscans: slice, ascans: slice) -> dict[str, Any]:
    """The sample dict of ``sample_id`` with ``oct`` cut to ``[bscans, :, ascans]`` (full depth), and
    ``meta["region"]`` = ``{"origin": [b0, w0], "volume_shape": [nB, D, W]}`` saying where the cut lies.

    CorpusError naming the file and sample for a region outside the volume, a missing shard file or
    undecodable chunks (as ``Corpus.read``). No checksum is verified: a digest covers whole arrays only.
    """
    row = corpus.row(sample_id)
    nb, depth, width = (int(n) for n in row["shape"])
    b0, b1, w0, w1 = bscans.start, bscans.stop, ascans.start, ascans.stop
    if bscans.step not in (None, 1) or ascans.step not in (None, 1) or not (0 <= b0 < b1 <= nb and 0 <= w0 < w1 <= width):
        raise CorpusError(f"{corpus.path}: sample {sample_id}: crop {bscans}, {ascans} is not a non-empty region "
                          f"of the volume's {nb} B-scans x {width} A-scans")
    grid, index = corpus.slot(VOLUME_KEY, row)
    arr = corpus.array(VOLUME_KEY, grid)
    if tuple(arr.chunks[1:]) == tuple(arr.shape[1:]):  # one chunk per volume: the whole read is the cheapest
        sample = corpus.read(sample_id)
        sample[VOLUME_KEY] = sample[VOLUME_KEY][b0:b1, :, w0:w1]
    else:
        sample = {"id": sample_id}
        for key in (*row["modalities"], *row["labels"]):
            sample[key] = _region(corpus, arr, row, index, b0, b1, w0, w1) if key == VOLUME_KEY else \
                corpus.read_array(key, row)
        sample["meta"] = meta_of(row)
    sample["meta"]["region"] = {"origin": [b0, w0], "volume_shape": [nb, depth, width]}
    return sample


def _region(corpus: Any, arr: Any, row: dict[str, Any], index: int, b0: int, b1: int, w0: int, w1: int) -> Any:
    """``arr[index, b0:b1, :, w0:w1]``: the shard fast path reads the cached shard index and the chunks the
    region overlaps; Zarr (the same bytes, more requests) where it cannot, and for every error."""
    if index >= arr.shape[0]:
        raise CorpusError(f"{corpus.zarr_path}/oct/{row['grid']}: sample {row['id']}: manifest index {index} is "
                          f"beyond the array's {arr.shape[0]} volumes (row without data)")
    where = f"{corpus.zarr_path}/{VOLUME_KEY}/{row['grid']}"
    cached = _layouts.get(where)
    if cached is None or cached[0] is not arr:
        cached = _layouts[where] = (arr, region_layout_of(arr))
    if cached[1] is not None:
        data = _reader.read_region(where, cached[1], index, (b0, b1), (w0, w1))
        if data is not None:
            return data
    path = str(corpus.shard_file(VOLUME_KEY, row["grid"], index))
    zeros = row["sha256"].get(VOLUME_KEY) == mf.zeros_sha256(tuple(arr.shape[1:]))  # no file: Zarr stores no empty chunk
    if not zeros and not (Location.parse(path).is_file() if is_url(path) else os.path.isfile(path)):
        raise CorpusError(f"{path}: sample {row['id']}: shard file holding 'oct' is missing (deleted, or "
                          "never copied or synced); restore it from a backup or re-ingest")
    try:
        return arr[index, b0:b1, :, w0:w1]
    except Exception as err:  # any codec failure means the stored bytes are damaged
        raise CorpusError(f"{path}: sample {row['id']}: cannot decode the 'oct' crop: {err}") from err
