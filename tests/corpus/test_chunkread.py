"""The fast shard reader: same arrays as Zarr for every slot, errors via the Zarr path, appends seen, fallbacks."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, GzipCodec, ShardingCodec, ZstdCodec
from zarr.storage import LocalStore

from octssl.corpus import chunkread
from octssl.corpus.chunkread import ChunkReader, layout_of
from octssl.corpus.store import Corpus
from octssl.errors import CorpusError

SHAPE = (4, 8, 8)


def item(sid: str, seed: int, *, localizer: tuple[int, int] | None = None, ga: str | None = None,
         enface: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    out = {"id": sid, "oct": rng.integers(0, 256, SHAPE, dtype=np.uint8),
           "meta": {"patient": f"p{seed % 3}", "eye": "OD", "visit": seed, "device": "test",
                    "scan_pattern": "raster", "spacing_mm": (0.1, 0.005, 0.02)}}
    if enface:
        out["faf"] = rng.integers(0, 256, (SHAPE[0], SHAPE[2]), dtype=np.uint8)
        out["slo"] = rng.integers(0, 256, (SHAPE[0], SHAPE[2]), dtype=np.uint8)
    if ga == "empty":  # a labelled volume without lesions: Zarr stores no chunk, the slot reads as fill value
        out["ga"] = np.zeros((SHAPE[0], SHAPE[2]), np.uint8)
    elif ga == "lesion":  # with RPD too
        out["ga"] = (rng.random((SHAPE[0], SHAPE[2])) < 0.3).astype(np.uint8)
        out["rpd"] = (rng.random((SHAPE[0], SHAPE[2])) < 0.1).astype(np.uint8)
    if localizer is not None:
        out["localizer"] = rng.integers(0, 256, localizer, dtype=np.uint8)
    return out


def zarr_slot(corpus_path: Path, name: str, index: int) -> np.ndarray:
    """One slot read by zarr-python alone (the reference the fast path must match)."""
    return zarr.open_array(LocalStore(corpus_path / "volumes.zarr", read_only=True), path=name)[index]


def stored_arrays(zarr_dir: Path) -> list[str]:
    return sorted(p.parent.relative_to(zarr_dir).as_posix() for p in zarr_dir.glob("*/*/zarr.json"))


def shard_index(shard: Path, chunks: int) -> np.ndarray:
    """(offset, nbytes) per chunk from the index at the end of a shard file (zarr v3 sharding spec)."""
    return np.frombuffer(shard.read_bytes()[-4 - 16 * chunks:-4], "<u8").reshape(-1, 2)


@pytest.fixture
def mixed_corpus(make_corpus) -> Path:
    """A synthetic corpus plus volumes with localizers of two sizes, an empty GA mask and no en-face images."""
    path = make_corpus(volumes=6, grid=SHAPE, seed=2, labelled=0.5)
    Corpus.open(path).append([
        item("loc-a", 1, localizer=(16, 12), ga="lesion"), item("loc-b", 2, localizer=(6, 5)),
        item("loc-c", 3, localizer=(16, 12), ga="empty"), item("bare", 4, enface=False),
    ], progress=False)
    return path


def test_every_slot_of_every_array_matches_zarr(mixed_corpus: Path) -> None:
    zarr_dir = mixed_corpus / "volumes.zarr"
    names = stored_arrays(zarr_dir)
    assert {n.split("/")[0] for n in names} == {"oct", "faf", "slo", "ga", "rpd", "localizer"}
    reader, slots = ChunkReader(), 0
    for name in names:
        arr = zarr.open_array(LocalStore(zarr_dir, read_only=True), path=name)
        layout = layout_of(arr)
        assert layout is not None, name
        for index in range(arr.shape[0]):
            (got,) = reader.read([(zarr_dir / name, layout, index)])
            want = arr[index]
            assert got is not None and got.dtype == want.dtype and got.shape == want.shape, (name, index)
            np.testing.assert_array_equal(got, want, err_msg=f"{name}[{index}]")
            slots += 1
    assert reader.served == slots and reader.declined == 0
    ga = zarr.open_array(LocalStore(zarr_dir, read_only=True), path=f"ga/{'x'.join(map(str, SHAPE))}")
    entries = shard_index(zarr_dir / ga.path / "c" / "0" / "0" / "0", ga.shards[0])[:ga.shape[0]]
    assert (entries[:, 0] == 2**64 - 1).sum() >= 2  # slots without a stored chunk (fill value) were read too


def test_corpus_read_matches_zarr_for_every_sample(mixed_corpus: Path) -> None:
    corpus = Corpus.open(mixed_corpus)
    for row in corpus.manifest.to_pylist():
        got = corpus.read(row["id"], localizer=True)
        keys = [*row["modalities"], *row["labels"]] + (["localizer"] if row["localizer_grid"] else [])
        assert [k for k in got if k not in ("id", "meta")] == keys  # same keys, same order as before
        for key in keys:
            grid, index = corpus.slot(key, row)
            want = zarr_slot(mixed_corpus, f"{key}/{grid}", index)
            np.testing.assert_array_equal(got[key], want, err_msg=f"{row['id']} {key}")
            assert got[key].dtype == np.uint8 and got[key].flags.writeable
    assert corpus.backend.chunks.declined == 0 and corpus.backend.chunks.served > 0
    assert corpus.verify() == []


def _read_in_child(corpus: Corpus, sample_id: str, out: multiprocessing.Queue) -> None:
    out.put({k: v for k, v in corpus.read(sample_id, localizer=True).items() if k != "meta"})


def test_a_forked_loader_worker_reads_with_its_own_helper_threads(mixed_corpus: Path) -> None:
    """DataLoader workers fork with the parent's Corpus: the parent's idle helper threads do not exist there."""
    corpus = Corpus.open(mixed_corpus)
    sample_id = "loc-a"  # six arrays: five go to helper threads at once
    for _ in range(3):
        want = corpus.read(sample_id, localizer=True)  # the parent's helper threads are started and idle
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    child = context.Process(target=_read_in_child, args=(corpus, sample_id, out))
    child.start()
    try:
        got = out.get(timeout=30)
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    assert sorted(got) == sorted(k for k in want if k != "meta")
    for key, value in got.items():
        if key != "id":
            np.testing.assert_array_equal(value, want[key])


def test_a_corpus_that_has_read_still_pickles(mixed_corpus: Path) -> None:
    """Corpus handles travel to Ray tasks and spawned workers; the reader's threads and locks must not block that."""
    import pickle

    corpus = Corpus.open(mixed_corpus)
    want = corpus.read("loc-a", localizer=True)
    copy = pickle.loads(pickle.dumps(corpus))
    got = copy.read("loc-a", localizer=True)
    for key in ("oct", "faf", "slo", "ga", "rpd", "localizer"):
        np.testing.assert_array_equal(got[key], want[key])
    assert copy.backend.chunks.served == 6


@pytest.mark.parametrize(("dtype", "inner", "index_location", "compressors"), [
    ("uint8", 1, "end", [ZstdCodec(level=1, checksum=True), Crc32cCodec()]),
    ("uint16", 2, "start", [ZstdCodec(level=3)]),
    ("float32", 3, "end", [Crc32cCodec()]),
    ("int16", 1, "start", []),
])
def test_layouts_beyond_the_corpus_default(tmp_path: Path, dtype: str, inner: int, index_location: str,
                                           compressors: list) -> None:
    """Several slots per chunk, the index at the start, uint16/float32, crc32c, no compressor: same as Zarr."""
    store = LocalStore(tmp_path / "z")
    sharding = ShardingCodec(chunk_shape=(inner, 3, 5), codecs=[BytesCodec(), *compressors],
                             index_location=index_location)
    arr = zarr.create_array(store, name="a", shape=(13, 3, 5), dtype=dtype, chunks=(3 * inner, 3, 5),
                            serializer=sharding, compressors=None, fill_value=7)
    data = np.random.default_rng(0).normal(100, 30, (13, 3, 5)).astype(dtype)
    data[4:6] = 7  # whole chunks of fill value are not stored
    arr[:] = data
    layout = layout_of(arr)
    assert layout is not None and layout.slots_per_chunk == inner
    reader = ChunkReader()
    got = reader.read([(tmp_path / "z" / "a", layout, i) for i in range(13)])
    for i in range(13):
        assert got[i] is not None and got[i].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got[i], arr[i])
    assert reader.served == 13


def test_a_corrupt_chunk_raises_the_corpus_error_naming_file_and_sample(make_corpus) -> None:
    path = make_corpus(volumes=6, grid=SHAPE, seed=1, labelled=1.0)
    corpus = Corpus.open(path)
    grid = "x".join(map(str, SHAPE))
    victim = corpus.manifest.to_pylist()[2]
    shard = corpus.shard_file("oct", grid, victim["index"])
    offset, _ = shard_index(shard, corpus.array("oct", grid).shards[0])[victim["index"]]
    raw = bytearray(shard.read_bytes())
    raw[offset + 20:offset + 36] = b"\xff" * 16
    shard.write_bytes(bytes(raw))
    damaged = Corpus.open(path)
    with pytest.raises(CorpusError, match=f"{shard}: sample {victim['id']}: cannot decode 'oct'"):
        damaged.read(victim["id"])
    layout = damaged.backend.chunks.layout("oct", damaged.array("oct", grid))
    assert ChunkReader().read([(path / "volumes.zarr" / "oct" / grid, layout, victim["index"])]) == [None]
    problems = damaged.verify()
    assert [p for p in problems if "cannot decode" in p] == [
        next(p for p in problems if p.startswith(f"{shard}: sample {victim['id']}: cannot decode 'oct'"))]
    np.testing.assert_array_equal(damaged.read(corpus.manifest.to_pylist()[3]["id"])["oct"],
                                  zarr_slot(path, f"oct/{grid}", 3))  # the neighbours still read


def test_a_bad_chunk_crc32c_is_caught(tmp_path: Path) -> None:
    """A chain with crc32c after zstd: a flipped checksum byte decodes fine but must not be served."""
    store = LocalStore(tmp_path / "z")
    arr = zarr.create_array(store, name="a", shape=(4, 6), dtype="uint8", chunks=(1, 6), shards=(4, 6),
                            compressors=[ZstdCodec(), Crc32cCodec()])
    arr[:] = np.arange(24, dtype=np.uint8).reshape(4, 6) + 1
    shard = tmp_path / "z" / "a" / "c" / "0" / "0"
    offset, nbytes = shard_index(shard, 4)[1]
    raw = bytearray(shard.read_bytes())
    raw[offset + nbytes - 1] ^= 0xFF  # the chunk's last byte: its crc32c
    shard.write_bytes(bytes(raw))
    reader = ChunkReader()
    got = reader.read([(tmp_path / "z" / "a", layout_of(arr), i) for i in range(4)])
    assert got[1] is None and reader.declined == 1
    np.testing.assert_array_equal(got[2], np.arange(12, 18) + 1)
    with pytest.raises(ValueError, match="checksum"):  # and Zarr, which the corpus falls back to, raises
        zarr.open_array(LocalStore(tmp_path / "z"), path="a")[1]


def test_a_chunk_of_the_wrong_size_is_not_served(tmp_path: Path) -> None:
    """A shard whose valid zstd frame holds fewer bytes than a chunk: Zarr raises, the fast path declines."""
    import google_crc32c

    store = LocalStore(tmp_path / "z")
    arr = zarr.create_array(store, name="a", shape=(2, 6), dtype="uint8", chunks=(1, 6), shards=(2, 6),
                            compressors=[ZstdCodec()])
    frames = [numcodecs.Zstd().encode(np.full(6, 9, np.uint8)), numcodecs.Zstd().encode(np.full(5, 9, np.uint8))]
    index = np.array([[0, len(frames[0])], [len(frames[0]), len(frames[1])]], "<u8").tobytes()
    (tmp_path / "z" / "a" / "c" / "0").mkdir(parents=True)
    (tmp_path / "z" / "a" / "c" / "0" / "0").write_bytes(
        b"".join(frames) + index + google_crc32c.value(index).to_bytes(4, "little"))
    got = ChunkReader().read([(tmp_path / "z" / "a", layout_of(arr), i) for i in range(2)])
    np.testing.assert_array_equal(got[0], np.full(6, 9))
    assert got[1] is None
    with pytest.raises(ValueError):
        arr[1]


def test_appends_after_a_cached_index_are_seen(tmp_path: Path) -> None:
    corpus = Corpus.create(tmp_path / "c")
    corpus.append([item(f"v{i}", i, ga="lesion" if i else None) for i in range(3)], progress=False)
    before = corpus.read("v1")  # caches the index of the one shard file of each array
    shard = corpus.shard_file("oct", "x".join(map(str, SHAPE)), 0)
    old_version = shard.stat().st_mtime_ns, shard.stat().st_size
    added = [item(f"w{i}", 10 + i, ga="lesion") for i in range(3)]
    corpus.append(added, progress=False)  # rewrites the same shard files (slots 3..5 were empty)
    assert (shard.stat().st_mtime_ns, shard.stat().st_size) != old_version
    served = corpus.backend.chunks.served
    for sample in added:
        got = corpus.read(sample["id"])
        for key in ("oct", "faf", "slo", "ga", "rpd"):
            np.testing.assert_array_equal(got[key], sample[key], err_msg=f"{sample['id']} {key}")
    assert corpus.backend.chunks.served - served == 15 and corpus.backend.chunks.declined == 0
    np.testing.assert_array_equal(corpus.read("v1")["oct"], before["oct"])
    other = Corpus.open(tmp_path / "c")  # a second handle agrees
    np.testing.assert_array_equal(other.read("w2")["ga"], added[2]["ga"])


@pytest.mark.parametrize("codec", [GzipCodec(level=1), BloscCodec(cname="lz4")])
def test_an_unknown_codec_falls_back_to_zarr(make_corpus, codec) -> None:
    path = make_corpus(volumes=5, grid=SHAPE, seed=4, labelled=0.0)
    grid = "x".join(map(str, SHAPE))
    expected = {row["id"]: Corpus.open(path).read(row["id"]) for row in Corpus.open(path).manifest.to_pylist()}
    store = LocalStore(path / "volumes.zarr")
    faf = zarr.open_array(store, path=f"faf/{grid}")[:]
    zarr.create_array(store, name=f"faf/{grid}", shape=faf.shape, dtype="uint8", chunks=(1, *faf.shape[1:]),
                      shards=(8, *faf.shape[1:]), compressors=codec, overwrite=True)[:] = faf
    corpus = Corpus.open(path)
    assert layout_of(corpus.array("faf", grid)) is None
    for sid, want in expected.items():
        got = corpus.read(sid)
        for key in ("oct", "faf", "slo"):
            np.testing.assert_array_equal(got[key], want[key])
    assert corpus.backend.chunks.declined == len(expected)  # faf only: oct and slo still take the fast path
    assert corpus.backend.chunks.served == 2 * len(expected)
    assert corpus.verify() == []


def test_unsharded_arrays_and_missing_shard_files_are_left_to_zarr(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "z")
    plain = zarr.create_array(store, name="plain", shape=(3, 4), dtype="uint8", chunks=(1, 4))
    assert layout_of(plain) is None
    arr = zarr.create_array(store, name="a", shape=(6, 4), dtype="uint8", chunks=(1, 4), shards=(2, 4))
    arr[:] = 5
    (tmp_path / "z" / "a" / "c" / "1" / "0").unlink()  # slots 2 and 3
    reader = ChunkReader()
    got = reader.read([(tmp_path / "z" / "a", layout_of(arr), i) for i in range(6)])
    assert [g is None for g in got] == [False, False, True, True, False, False]
    assert reader.read([(tmp_path / "z" / "plain", None, 0)]) == [None]


@pytest.mark.parametrize("size", [0, 1, 200, 255, 256, 300, 65_791, 65_792, 70_000, 3_000_000])
def test_zstd_content_size_from_the_frame_header(size: int) -> None:
    data = np.random.default_rng(size).integers(0, 4, size, dtype=np.uint8)
    for codec in (numcodecs.Zstd(level=1), numcodecs.Zstd(level=5, checksum=True)):
        assert chunkread._zstd_content_size(codec.encode(data)) == size
    assert chunkread._zstd_content_size(b"not a zstd frame") is None
