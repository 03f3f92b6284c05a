"""Sub-volume chunks: a crop read returns exactly the crop of the whole volume and reads fewer bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from octssl.corpus import region
from octssl.corpus.layout import shard_length, volume_chunking
from octssl.corpus.region import read_crop
from octssl.corpus.store import Corpus
from octssl.data.sources import ZarrSource
from octssl.data.transforms import TrainTransform
from octssl.errors import CorpusError

GRID = (12, 32, 48)  # nB, D, W: small, so sub-volume chunks are forced by the corpus setting


def _samples(count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)  # noise: it does not compress, so bytes read follow chunks read
    return [{"id": f"s{i}", "oct": rng.integers(0, 256, GRID, dtype=np.uint8),
             "faf": rng.integers(0, 256, (GRID[0], GRID[2]), dtype=np.uint8),
             "meta": {"patient": f"p{i}", "eye": "OD", "visit": 0, "device": "test", "scan_pattern": "raster",
                      "spacing_mm": (0.1, 0.01, 0.1), "split": "train"}} for i in range(count)]


def _bytes_read() -> int:
    """Bytes this process passed through read()/pread() so far (Linux /proc/self/io ``rchar``)."""
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])


@pytest.fixture
def corpora(tmp_path: Path) -> tuple[Corpus, Corpus]:
    whole = Corpus.create(tmp_path / "whole")
    whole.append(_samples(4), progress=False)
    chunked = Corpus.create(tmp_path / "chunked", volume_chunk=(4, 8), shard_bytes=4 * int(np.prod(GRID)))
    chunked.append(_samples(4), progress=False)
    return Corpus.open(tmp_path / "whole"), Corpus.open(tmp_path / "chunked")


def test_chunk_choice_keeps_small_volumes_whole_and_chunks_large_ones():
    assert volume_chunking(GRID, None) == (GRID, GRID)  # the demo's and the tests' grids: as before
    assert volume_chunking((49, 496, 512), None) == ((4, 496, 64), (52, 496, 512))  # the paper's grid
    assert shard_length(49 * 496 * 512, 256 * 2**20, 13 * 8) == 9  # its shard index stays <= 1024 chunks
    assert volume_chunking((49, 496, 512), [64, 1024]) == ((49, 496, 512), (49, 496, 512))


def test_crop_read_is_the_crop_of_the_whole_read_and_reads_fewer_bytes(corpora):
    whole, chunked = corpora
    meta = json.loads((chunked.zarr_path / "oct" / "12x32x48" / "zarr.json").read_text())
    assert meta["codecs"][0]["configuration"]["chunk_shape"] == [1, 4, 32, 8]
    bscans, ascans = slice(3, 9), slice(5, 21)
    served = region._reader.served
    for sid in ("s1", "s2"):
        full = chunked.read(sid)  # through Zarr: the fast path reads whole-volume chunks only
        crop = read_crop(chunked, sid, bscans, ascans)
        assert np.array_equal(crop["oct"], full["oct"][bscans, :, ascans])
        assert np.array_equal(crop["faf"], full["faf"])  # en-face arrays are read whole
        assert np.array_equal(full["oct"], whole.read(sid)["oct"])  # same data in either chunking
        assert crop["meta"]["region"] == {"origin": [3, 5], "volume_shape": list(GRID)}
        old = read_crop(whole, sid, bscans, ascans)  # one chunk per volume: read whole and cut
        assert np.array_equal(old["oct"], crop["oct"])
    assert region._reader.served == served + 2  # the crops came from the shard fast path

    before = _bytes_read()
    chunked.read("s3")
    whole_bytes = _bytes_read() - before
    before = _bytes_read()
    read_crop(chunked, "s3", slice(4, 10), slice(8, 24))
    crop_bytes = _bytes_read() - before
    # The crop overlaps 2 x 2 of the volume's 3 x 6 chunks: about a fifth of its bytes (plus the shard index).
    assert whole_bytes > int(np.prod(GRID)) and crop_bytes < 0.4 * whole_bytes, (crop_bytes, whole_bytes)
    assert crop_bytes > 4 * 4 * 32 * 8  # it did read the crop's chunks


def test_training_samples_are_the_same_from_crop_reads(corpora):
    whole, chunked = corpora
    transform = TrainTransform(crop=(5, 20), targets=("faf",), seed=7)
    from_whole = ZarrSource(whole, split=None, transform=transform, repeats=3)
    from_crops = ZarrSource(chunked, split=None, transform=transform, repeats=3)
    verified = ZarrSource(chunked, split=None, transform=transform, repeats=3, verify=True)  # whole reads
    for index in range(len(from_whole)):
        a, b, c = from_whole[index], from_crops[index], verified[index]
        assert a["meta"] == b["meta"] == c["meta"] and "region" not in b["meta"]
        for key in ("oct", "faf"):
            assert np.array_equal(a[key], b[key]) and np.array_equal(a[key], c[key])


def test_bad_region_and_missing_shard_are_clear_errors(corpora):
    _, chunked = corpora
    with pytest.raises(CorpusError, match="not a non-empty region"):
        read_crop(chunked, "s0", slice(8, 14), slice(0, 8))
    shard = chunked.shard_file("oct", "12x32x48", 0)
    Path(shard).unlink()
    reopened = Corpus.open(chunked.path)
    with pytest.raises(CorpusError, match="shard file holding 'oct' is missing"):
        read_crop(reopened, "s0", slice(0, 4), slice(0, 8))
