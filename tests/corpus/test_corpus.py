"""Corpus: layout, append/read round trip, bad inputs, splits, label fractions, verify."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import zarr

from octssl.corpus import manifest as mf
from octssl.corpus.journal import WriterLock
from octssl.corpus.layout import assign_split
from octssl.corpus.store import Corpus
from octssl.errors import CorpusError, SampleError

SHAPE = (4, 8, 8)


def sample(sid: str, patient: str = "p0", *, shape: tuple[int, int, int] = SHAPE, faf: bool = True,
           ga: bool = False, split: str | None = None, seed: int = 0, **meta: object) -> dict:
    rng = np.random.default_rng([seed, int(hashlib.sha256(sid.encode()).hexdigest()[:8], 16)])
    nb, _, width = shape
    out = {"id": sid, "oct": rng.integers(0, 256, shape, dtype=np.uint8)}
    if faf:
        out["faf"] = rng.integers(0, 256, (nb, width), dtype=np.uint8)
    if ga:
        out["ga"] = (rng.random((nb, width)) < 0.3).astype(np.uint8)
    out["meta"] = {"patient": patient, "eye": "OD", "visit": 0, "device": "test", "scan_pattern": "raster",
                   "spacing_mm": (0.1, 0.005, 0.02), "split": split, **meta}
    return out


@pytest.fixture
def corpus(tmp_path: Path) -> Corpus:
    return Corpus.create(tmp_path / "c")


def test_round_trip_keeps_arrays_meta_and_checksums(corpus: Corpus) -> None:
    given = [sample("a", ga=True), sample("b", faf=False), sample("c", patient="p1", acquired="2021-03-04")]
    assert corpus.append(given, progress=False) == ["a", "b", "c"]
    reopened = Corpus.open(corpus.path)
    for original in given:
        got = reopened.read(original["id"], verify=True)
        keys = [k for k in ("oct", "faf", "slo", "ga", "rpd") if k in original]
        assert [k for k in ("oct", "faf", "slo", "ga", "rpd") if k in got] == keys  # absent stays absent
        for key in keys:
            assert got[key].dtype == np.uint8
            np.testing.assert_array_equal(got[key], original[key])
            assert reopened.row(original["id"])["sha256"][key] == hashlib.sha256(original[key].tobytes()).hexdigest()
        assert got["meta"]["patient"] == original["meta"]["patient"]
        assert got["meta"]["spacing_mm"] == (0.1, 0.005, 0.02)
        assert got["meta"]["grid"] == "4x8x8" and got["meta"]["raster"] is True
    assert reopened.read("a")["meta"]["labels"] == ["ga"]
    assert reopened.read("b")["meta"]["modalities"] == ["oct"]
    assert reopened.read("c")["meta"]["acquired"] == "2021-03-04"
    assert reopened.verify() == []


def test_layout_is_sharded_zarr_v3_one_volume_per_chunk(tmp_path: Path) -> None:
    volume_bytes = int(np.prod(SHAPE))
    corpus = Corpus.create(tmp_path / "c", shard_bytes=3 * volume_bytes)
    corpus.append([sample(f"s{i}") for i in range(7)], progress=False)
    arr = zarr.open_array(zarr.storage.LocalStore(corpus.zarr_path), path="oct/4x8x8")
    assert arr.metadata.zarr_format == 3
    assert arr.shape == (7, *SHAPE) and arr.chunks == (1, *SHAPE) and arr.shards == (3, *SHAPE)
    shard_files = sorted(p for p in (corpus.zarr_path / "oct" / "4x8x8" / "c").rglob("*") if p.is_file())
    assert len(shard_files) == math.ceil(7 / 3)  # few files: one per shard, not one per volume
    assert "ZstdCodec" in str(arr.metadata.codecs)
    assert corpus.grids == ["4x8x8"]


def test_grids_are_separate_buckets(corpus: Corpus) -> None:
    corpus.append([sample("a"), sample("b", shape=(2, 6, 10)), sample("c")], progress=False)
    assert corpus.grids == ["2x6x10", "4x8x8"]
    assert [corpus.row(s)["index"] for s in "abc"] == [0, 0, 1]
    assert corpus.read("b")["oct"].shape == (2, 6, 10)


def test_float32_input_is_stored_as_uint8(corpus: Corpus) -> None:
    item = sample("f", ga=True)
    item["oct"] = item["oct"].astype(np.float32) / 255.0
    item["ga"] = item["ga"].astype(np.float32)
    corpus.append([item], progress=False)
    got = corpus.read("f")
    np.testing.assert_array_equal(got["oct"], np.rint(item["oct"] * 255).astype(np.uint8))
    np.testing.assert_array_equal(got["ga"], item["ga"].astype(np.uint8))


def _nan_oct() -> dict:
    item = sample("bad")
    item["oct"] = item["oct"].astype(np.float32) / 255
    item["oct"][1, 2, 3] = np.nan
    return item


def _with(**changes: object) -> dict:
    item = sample("bad")
    for key, value in changes.items():
        item[key] = value
    return item


@pytest.mark.parametrize(
    ("make_bad", "message"),
    [
        (lambda: _with(oct=np.zeros(SHAPE, np.uint16)), "'oct' must be uint8 or float32"),
        (lambda: _with(oct=np.zeros((4, 8), np.uint8)), "'oct' must be"),
        (lambda: _with(faf=np.zeros((4, 7), np.uint8)), "'faf' must be"),
        (_nan_oct, "NaN"),
        (lambda: _with(oct=np.full(SHAPE, 2.0, np.float32)), r"must lie in \[0, 1\]"),
        (lambda: _with(ga=np.full((4, 8), 3, np.uint8)), "mask 'ga' must hold 0/1"),
        (lambda: {**sample("bad"), "meta": {"patient": "p"}}, "meta lacks"),
        (lambda: sample("bad", eye="left"), "meta 'eye'"),
        (lambda: sample("bad", spacing_mm=(0.1, float("nan"), 0.1)), "spacing_mm"),
        (lambda: sample("s0"), "id already in the corpus"),
    ],
)
def test_bad_sample_fails_append_and_leaves_corpus_as_it_was(corpus: Corpus, make_bad, message: str) -> None:
    corpus.append([sample("s0"), sample("s1", shape=(2, 6, 10))], progress=False)
    before = {p: p.read_bytes() for p in corpus.path.rglob("*") if p.is_file() and p.name != ".lock"}
    good_then_bad = [sample("s2"), sample("s3", shape=(2, 6, 10)), make_bad()]
    with pytest.raises(SampleError, match=message) as info:
        corpus.append(good_then_bad, progress=False)
    assert str(corpus.path) in str(info.value) and "sample " in str(info.value)
    after = {p: p.read_bytes() for p in corpus.path.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after.keys() == before.keys()  # rolled back: no new shard files, no journal left
    assert all(after[p] == before[p] for p in before)
    reopened = Corpus.open(corpus.path)
    assert reopened.ids() == ["s0", "s1"] and reopened.verify() == []


def test_second_writer_gets_a_clear_error(corpus: Corpus) -> None:
    with WriterLock(corpus.path), pytest.raises(CorpusError, match=r"\.lock: another writer \(pid \d+\)"):
        corpus.append([sample("a")], progress=False)
    corpus.append([sample("a")], progress=False)  # released: appends again
    assert corpus.ids() == ["a"]


def test_create_and_open_errors_name_the_path(tmp_path: Path) -> None:
    Corpus.create(tmp_path / "c")
    with pytest.raises(CorpusError, match="a corpus already exists"):
        Corpus.create(tmp_path / "c")
    with pytest.raises(CorpusError, match="no corpus directory"):
        Corpus.open(tmp_path / "nope")
    (tmp_path / "c" / mf.MANIFEST_NAME).unlink()
    with pytest.raises(CorpusError, match=r"c/manifest\.parquet: manifest is missing"):
        Corpus.open(tmp_path / "c")
    (tmp_path / "d").mkdir()
    with pytest.raises(CorpusError, match=r"d/volumes\.zarr: missing"):
        Corpus.open(tmp_path / "d")


# ---- splits ----------------------------------------------------------------------------------------
def test_split_is_deterministic_and_follows_the_ratios() -> None:
    patients = [f"patient-{i}" for i in range(3000)]
    first = [assign_split(p, (0.6, 0.2, 0.2)) for p in patients]
    assert first == [assign_split(p, [0.6, 0.2, 0.2]) for p in patients]
    shares = {s: first.count(s) / len(first) for s in mf.SPLITS}
    assert abs(shares["train"] - 0.6) < 0.03 and abs(shares["val"] - 0.2) < 0.03
    assert {assign_split(p, (0.0, 0.0, 1.0)) for p in patients[:50]} == {"test"}


def test_patient_keeps_its_split_across_appends(tmp_path: Path) -> None:
    corpus = Corpus.create(tmp_path / "c", split_ratios=(0.5, 0.25, 0.25))
    corpus.append([sample(f"{p}-v0", patient=p) for p in ("ann", "bob", "cy", "dee")], progress=False)
    first = {row["patient"]: row["split"] for row in corpus.rows}  # the hash, or a split it would leave empty
    assert set(first.values()) == set(mf.SPLITS)
    ann = first["ann"]
    other = next(s for s in mf.SPLITS if s != ann)
    with pytest.raises(SampleError, match=f"meta split '{other}' contradicts patient ann's split '{ann}'"):
        corpus.append([sample("ann-moved", patient="ann", split=other)], progress=False)
    corpus.append([sample("ann-given", patient="ann", split=ann), sample("eve-v0", patient="eve", split="val")],
                  progress=False)
    corpus.append([sample(f"{p}-v1", patient=p) for p in ("ann", "bob", "cy", "dee", "eve")], progress=False)
    reopened = Corpus.open(corpus.path)
    for p in ("ann", "bob", "cy", "dee"):
        assert reopened.row(f"{p}-v0")["split"] == first[p]
        assert reopened.row(f"{p}-v1")["split"] == reopened.row(f"{p}-v0")["split"]
    assert "ann-moved" not in reopened.ids()
    assert reopened.row("eve-v1")["split"] == "val"  # a split given in meta is kept for the patient


# ---- label fractions -------------------------------------------------------------------------------
@pytest.fixture
def labelled_corpus(tmp_path: Path) -> Corpus:
    """20 train patients with GA labels (2 visits each), 5 train patients without, 3 val patients with."""
    corpus = Corpus.create(tmp_path / "c")
    items = [sample(f"t{i}-v{v}", patient=f"t{i}", ga=True, split="train", visit=v) for i in range(20) for v in (0, 1)]
    items += [sample(f"u{i}", patient=f"u{i}", split="train") for i in range(5)]
    items += [sample(f"v{i}", patient=f"v{i}", ga=True, split="val") for i in range(3)]
    corpus.append(items, progress=False)
    return corpus


def test_label_fractions_are_nested_sized_and_deterministic(labelled_corpus: Corpus) -> None:
    fractions = [0.01, 0.1, 0.125, 0.25, 0.5, 1.0]
    subsets = [labelled_corpus.label_fraction_patients("ga", f) for f in fractions]
    assert [len(s) for s in subsets] == [1, 2, 3, 5, 10, 20]  # round half up (2.5 -> 3), at least 1
    for smaller, larger in zip(subsets, subsets[1:], strict=False):
        assert set(smaller) <= set(larger)
    assert set(subsets[-1]) == {f"t{i}" for i in range(20)}  # train patients with the label only
    reopened = Corpus.open(labelled_corpus.path)
    assert [reopened.label_fraction_patients("ga", f) for f in fractions] == subsets
    ids = reopened.ids(label="ga", label_fraction=0.1)
    assert sorted(ids) == sorted(f"{p}-v{v}" for p in subsets[1] for v in (0, 1))


def test_label_fraction_order_depends_on_the_seed(tmp_path: Path) -> None:
    picks = []
    for seed in range(4):
        corpus = Corpus.create(tmp_path / f"c{seed}", fraction_seed=seed)
        corpus.append([sample(f"t{i}", patient=f"t{i}", ga=True, split="train") for i in range(12)], progress=False)
        picks.append(tuple(corpus.label_fraction_patients("ga", 0.25)))
    assert len(set(picks)) > 1


def test_label_fraction_errors(labelled_corpus: Corpus) -> None:
    with pytest.raises(CorpusError, match="must lie in"):
        labelled_corpus.label_fraction_patients("ga", 0.0)
    with pytest.raises(CorpusError, match="no train patient has label 'rpd'"):
        labelled_corpus.label_fraction_patients("rpd", 0.5)
    with pytest.raises(CorpusError, match="needs a label"):
        labelled_corpus.ids(label_fraction=0.5)
    with pytest.raises(CorpusError, match="subset the train split"):
        labelled_corpus.ids(split="val", label="ga", label_fraction=0.5)


def test_ids_filters(corpus: Corpus) -> None:
    corpus.append([sample("a", split="train"), sample("b", faf=False, split="train"),
                   sample("c", patient="p1", split="val", ga=True),
                   sample("d", split="train", raster=False, scan_pattern="radial")], progress=False)
    assert corpus.ids() == ["a", "b", "c"]
    assert corpus.ids(raster_only=False) == ["a", "b", "c", "d"]
    assert corpus.ids(split="train", require=("oct", "faf")) == ["a"]
    assert corpus.ids(label="ga") == ["c"]
    assert corpus.row("d")["raster_reason"] == "radial"
    assert corpus.summary()["non_raster"] == {"radial": 1}


# ---- verify ----------------------------------------------------------------------------------------
def _chunk_holding(shard_file: Path, chunks_per_shard: int, offset: int) -> int:
    """Chunk whose bytes cover ``offset``, from the shard index at the end of the file (zarr v3 sharding spec:
    one little-endian (offset, nbytes) uint64 pair per chunk, then a crc32c)."""
    raw = shard_file.read_bytes()
    entries = np.frombuffer(raw[-4 - 16 * chunks_per_shard:-4], dtype="<u8").reshape(-1, 2)
    for i, (start, size) in enumerate(entries):
        if start != 2**64 - 1 and start <= offset < start + size:
            return i
    raise AssertionError(f"no chunk of {shard_file} covers byte {offset}")


def test_verify_reports_every_problem_in_one_pass(make_corpus, tmp_path: Path) -> None:
    path = make_corpus(volumes=8, grid=(8, 32, 32), seed=3, labelled=1.0)
    corpus = Corpus.open(path)
    rows = corpus.manifest.to_pylist()
    # 1. corrupt bytes inside one chunk of the oct shard file
    shard = corpus.shard_file("oct", "8x32x32", 0)
    raw = bytearray(shard.read_bytes())
    victim_slot = _chunk_holding(shard, corpus.array("oct", "8x32x32").shards[0], 200)
    raw[200:216] = b"\xff" * 16
    shard.write_bytes(bytes(raw))
    victim = next(r["id"] for r in rows if r["index"] == victim_slot)
    # 2. a manifest row without data (index beyond the array), 3. a wrong checksum in the manifest
    rows[1]["index"] = 99
    rows[2]["sha256"] = {**rows[2]["sha256"], "faf": "0" * 64}
    # 4. data without a manifest row: drop the last row from the manifest
    orphan = rows.pop()
    mf.write_manifest(mf.rows_table(rows, corpus.settings), corpus.manifest_path)
    # 5. a missing array (rpd) for every labelled row
    import shutil

    shutil.rmtree(corpus.zarr_path / "rpd" / "8x32x32")

    problems = Corpus.open(path).verify()
    text = "\n".join(problems)
    assert f"{shard}: sample {victim}: cannot decode 'oct'" in text
    assert f"sample {rows[1]['id']}: manifest index 99 is beyond" in text
    assert f"sample {rows[2]['id']}: 'faf' checksum mismatch" in text
    assert f"{corpus.zarr_path / 'oct' / '8x32x32'}: 2 slot(s) hold data without a manifest row" in text
    assert str(orphan["index"]) in text
    missing = [p for p in problems if "rpd/8x32x32: sample " in p and "array missing" in p]
    assert len(missing) == len(rows)  # every sample named, not just the first
    damaged = Corpus.open(path)
    with pytest.raises(CorpusError, match=f"sample {victim}: cannot decode 'oct'"):
        damaged.read_array("oct", damaged.row(victim))
    with pytest.raises(CorpusError, match=f"sample {victim}: array missing"):  # rpd is gone too
        damaged.read(victim)


def test_verify_flags_a_manifest_that_points_past_a_bucket(corpus: Corpus) -> None:
    corpus.append([sample("a")], progress=False)
    table = corpus.manifest
    grid = pa.array(["2x6x10"])
    table = table.set_column(table.column_names.index("grid"), "grid", grid)
    table = table.set_column(table.column_names.index("shape"), "shape", pa.array([[2, 6, 10]], pa.list_(pa.int32(), 3)))
    mf.write_manifest(mf.with_settings(table, corpus.settings), corpus.manifest_path)
    problems = Corpus.open(corpus.path).verify()
    assert any("oct/2x6x10: sample a: array missing" in p for p in problems)
    assert any("oct/4x8x8" in p and "without a manifest row" in p for p in problems)  # its old slot is orphaned


def test_verify_flags_arrays_of_the_wrong_shape_or_dtype(corpus: Corpus) -> None:
    corpus.append([sample("a"), sample("b")], progress=False)
    import shutil

    shutil.rmtree(corpus.zarr_path / "faf" / "4x8x8")
    zarr.create_array(zarr.storage.LocalStore(corpus.zarr_path), name="faf/4x8x8", shape=(2, 4, 9),
                      dtype="uint16")[:] = 1  # written: a missing shard file would be reported as such
    problems = Corpus.open(corpus.path).verify()
    assert any("faf/4x8x8: array is uint16(2, 4, 9), expected uint8[N, (4, 8)]" in p for p in problems)
    assert any("faf/4x8x8/c/0/0/0: sample a: 'faf' is uint16(4, 9)" in p for p in problems)
