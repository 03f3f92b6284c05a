"""The optional native-resolution localizer of the corpus: its buckets, manifest columns, reads, checks."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

from octssl.corpus import manifest as mf
from octssl.corpus.store import Corpus
from octssl.errors import CorpusError, SampleError
from octssl.sample import validate_sample

SHAPE = (4, 8, 8)


def item(sid: str, localizer: tuple[int, int] | None = (12, 10), patient: str = "p0", **meta: object) -> dict:
    rng = np.random.default_rng(int(hashlib.sha256(sid.encode()).hexdigest()[:8], 16))
    out = {"id": sid, "oct": rng.integers(0, 256, SHAPE, dtype=np.uint8),
           "slo": rng.integers(0, 256, (SHAPE[0], SHAPE[2]), dtype=np.uint8),
           "meta": {"patient": patient, "eye": "OD", "visit": 0, "device": "test", "scan_pattern": "raster",
                    "spacing_mm": (0.1, 0.005, 0.02)}}
    if localizer is not None:
        out["localizer"] = rng.integers(0, 256, localizer, dtype=np.uint8)
        out["meta"]["localizer_spacing_mm"] = (0.03, 0.04)
        out["meta"]["positions_mm"] = rng.uniform(0, 0.3, (SHAPE[0], 2, 2))
    out["meta"].update(meta)
    return out


def files(path: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in path.rglob("*") if p.is_file() and p.name != ".lock"}


def test_round_trip_buckets_checksums_and_the_training_sample_untouched(tmp_path: Path) -> None:
    given = [item("a"), item("b", localizer=None), item("c", localizer=(6, 5)), item("d")]
    corpus = Corpus.create(tmp_path / "c")
    corpus.append(given, progress=False)
    corpus = Corpus.open(corpus.path)
    rows = {sid: corpus.row(sid) for sid in "abcd"}
    assert [(rows[s]["localizer_grid"], rows[s]["localizer_index"]) for s in "abcd"] == [
        ("12x10", 0), (None, None), ("6x5", 0), ("12x10", 1)]  # buckets by size, slots of their own
    assert rows["b"]["sha256"]["localizer"] is None and rows["b"]["positions_mm"] is None
    for original in given:
        sid = original["id"]
        plain = corpus.read(sid)
        assert "localizer" not in plain and "positions_mm" not in plain["meta"]
        validate_sample(plain, "test")  # the training sample dict is unchanged
        full = corpus.read(sid, localizer=True, verify=True)
        np.testing.assert_array_equal(full["oct"], original["oct"])
        if "localizer" not in original:
            assert "localizer" not in full and full["meta"]["positions_mm"] is None
            continue
        np.testing.assert_array_equal(full["localizer"], original["localizer"])
        assert full["localizer"].dtype == np.uint8
        assert rows[sid]["sha256"]["localizer"] == hashlib.sha256(original["localizer"].tobytes()).hexdigest()
        assert full["meta"]["localizer_spacing_mm"] == (0.03, 0.04)
        assert full["meta"]["positions_mm"].shape == (SHAPE[0], 2, 2)
        np.testing.assert_array_equal(full["meta"]["positions_mm"], original["meta"]["positions_mm"])
    arr = zarr.open_array(zarr.storage.LocalStore(corpus.zarr_path), path="localizer/12x10")
    assert arr.shape == (2, 12, 10) and arr.chunks == (1, 12, 10) and arr.shards is not None
    assert "ZstdCodec" in str(arr.metadata.codecs)
    assert corpus.ids(require=("localizer",)) == ["a", "c", "d"]
    summary = corpus.summary()
    assert summary["modalities"]["localizer"] == 3 and summary["localizer_grids"] == {"12x10": 2, "6x5": 1}
    assert corpus.verify() == []


def test_later_appends_continue_the_localizer_buckets(tmp_path: Path) -> None:
    corpus = Corpus.create(tmp_path / "c", shard_bytes=2 * 12 * 10)  # 2 localizers per shard: several shards
    corpus.append([item("a"), item("b")], progress=False)
    corpus.append([item("c", localizer=None), item("d"), item("e")], progress=False)
    assert [corpus.row(s)["localizer_index"] for s in "abcde"] == [0, 1, None, 2, 3]
    assert len(list((corpus.zarr_path / "localizer" / "12x10" / "c").iterdir())) == 2
    np.testing.assert_array_equal(corpus.read("e", localizer=True)["localizer"], item("e")["localizer"])
    assert corpus.verify() == []


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"localizer": np.zeros((3, 4, 3), np.uint8)}, r"'localizer' must be a \(H, W\) uint8 or float32"),
        ({"localizer": np.zeros((3, 4), np.int16)}, "'localizer' must be a"),
        ({"localizer": np.full((3, 4), 2.0, np.float32)}, r"must lie in \[0, 1\]"),
        ({"meta_positions_mm": np.zeros((3, 2, 2))}, r"'positions_mm' must be \(4, 2, 2\)"),
        ({"meta_positions_mm": np.full((4, 2, 2), np.nan)}, "'positions_mm' must be"),
        ({"meta_localizer_spacing_mm": (0.0, 0.1)}, "'localizer_spacing_mm' must be 2 positive"),
        ({"localizer": None}, "given without a 'localizer'"),
    ],
)
def test_bad_localizers_fail_the_append_and_change_nothing(tmp_path: Path, bad: dict, message: str) -> None:
    corpus = Corpus.create(tmp_path / "c", shard_bytes=12 * 10)  # 1 localizer per shard: flushed at once
    corpus.append([item("a")], progress=False)
    before = files(corpus.path)
    broken = item("bad")
    for key, value in bad.items():
        if key.startswith("meta_"):
            broken["meta"][key[5:]] = value
        else:
            broken[key] = value
    with pytest.raises(SampleError, match=message) as info:
        corpus.append([item("b"), item("c"), broken], progress=False)  # b and c are written before bad fails
    assert "sample bad" in str(info.value)
    assert files(corpus.path) == before
    assert Corpus.open(corpus.path).verify() == []


def test_float32_localizer_is_stored_as_uint8(tmp_path: Path) -> None:
    corpus = Corpus.create(tmp_path / "c")
    given = item("f")
    given["localizer"] = np.linspace(0, 1, 120, dtype=np.float32).reshape(12, 10)
    corpus.append([given], progress=False)
    got = corpus.read("f", localizer=True)["localizer"]
    np.testing.assert_array_equal(got, np.rint(given["localizer"] * 255).astype(np.uint8))


def _as_format_1(corpus: Corpus) -> None:
    """Rewrite the manifest the way octssl wrote it before localizers: no localizer columns or digest."""
    table = corpus.manifest.drop_columns(list(mf.OPTIONAL_COLUMNS))
    old_sha = pa.struct([(k, pa.string()) for k in ("oct", "faf", "slo", "ga", "rpd")])
    schema = table.schema.set(table.schema.get_field_index("sha256"), pa.field("sha256", old_sha, nullable=False))
    settings = {**corpus.settings, "format": 1}
    old = table.cast(schema).replace_schema_metadata({b"octssl": mf.json.dumps(settings).encode()})
    pq.write_table(old, corpus.manifest_path)
    shutil.rmtree(corpus.zarr_path / "localizer", ignore_errors=True)


def test_format_1_corpus_opens_reads_verifies_and_takes_localizers(tmp_path: Path) -> None:
    corpus = Corpus.create(tmp_path / "c")
    corpus.append([item("a", localizer=None), item("b", localizer=None)], progress=False)
    _as_format_1(corpus)
    assert "localizer_grid" not in pq.read_table(corpus.manifest_path).column_names
    old = Corpus.open(corpus.path)
    assert old.settings["format"] == 1 and old.row("a")["localizer_grid"] is None
    got = old.read("a", localizer=True)
    assert "localizer" not in got and got["meta"]["positions_mm"] is None
    np.testing.assert_array_equal(got["oct"], item("a")["oct"])
    assert old.verify() == [] and old.summary()["modalities"]["localizer"] == 0
    old.append([item("c")], progress=False)
    new = Corpus.open(corpus.path)
    assert new.settings["format"] == mf.FORMAT_VERSION
    assert "localizer_grid" in pq.read_table(corpus.manifest_path).column_names
    np.testing.assert_array_equal(new.read("c", localizer=True)["localizer"], item("c")["localizer"])
    assert new.ids() == ["a", "b", "c"] and new.verify() == []


def test_verify_reports_a_corrupt_localizer_chunk_a_bad_digest_and_orphans(tmp_path: Path) -> None:
    corpus = Corpus.create(tmp_path / "c")
    corpus.append([item("a", localizer=(64, 64)), item("b", localizer=(64, 64)), item("c", localizer=(6, 5))],
                  progress=False)
    shard = corpus.shard_file("localizer", "64x64", 0)
    raw = bytearray(shard.read_bytes())
    raw[40:56] = b"\xff" * 16  # inside the first chunk (slot 0, sample a): chunks precede the shard index
    shard.write_bytes(bytes(raw))
    rows = corpus.manifest.to_pylist()
    rows[1]["sha256"] = {**rows[1]["sha256"], "localizer": "0" * 64}  # b: the manifest digest is wrong
    mf.write_manifest(mf.rows_table(rows[:2], corpus.settings), corpus.manifest_path)  # c's row dropped
    problems = Corpus.open(corpus.path).verify()
    text = "\n".join(problems)
    assert f"{shard}: sample a: cannot decode 'localizer'" in text
    assert f"{shard}: sample b: 'localizer' checksum mismatch" in text
    assert f"{corpus.zarr_path / 'localizer' / '6x5'}: 1 slot(s) hold data without a manifest row" in text
    damaged = Corpus.open(corpus.path)
    assert damaged.read("a")["oct"].shape == SHAPE  # the training read does not touch the localizer
    with pytest.raises(CorpusError, match="sample a: cannot decode 'localizer'"):
        damaged.read("a", localizer=True)
    with pytest.raises(CorpusError, match="sample b: 'localizer' checksum mismatch"):
        damaged.read("b", localizer=True, verify=True)


def test_row_problems_of_localizer_columns() -> None:
    base = {
        "id": "s", "patient": "p", "eye": "OD", "visit": 0, "device": "d", "scan_pattern": "line", "raster": False,
        "raster_reason": "line", "shape": [1, 8, 8], "spacing_mm": [0.1, 0.01, 0.05], "modalities": ["oct"],
        "labels": [], "split": "train", "grid": "1x8x8", "index": 0, "source": "x", "acquired": None,
        "sha256": {"oct": "ab" * 32, "localizer": "cd" * 32}, "localizer_grid": "6x5", "localizer_index": 0,
        "localizer_spacing_mm": [0.1, 0.1], "positions_mm": [[[0.0, 0.1], [0.4, 0.1]]],
    }
    rows = [
        base,
        {**base, "id": "t", "index": 1},  # localizer slot 0 of 6x5 again
        {**base, "id": "u", "index": 2, "localizer_index": 1, "positions_mm": [[[0.0, 0.1], [0.4, 0.1]]] * 2},
        {**base, "id": "v", "index": 3, "localizer_grid": None, "localizer_index": None,
         "localizer_spacing_mm": None, "sha256": {"oct": "ab" * 32}},  # positions without a localizer
        {**base, "id": "w", "index": 4, "localizer_index": 2, "localizer_spacing_mm": [0.0, 0.1],
         "sha256": {"oct": "ab" * 32}},
    ]
    text = "\n".join(mf.row_problems(mf.rows_table(rows, mf.DEFAULT_SETTINGS), "m.parquet"))
    assert "sample s:" not in text
    assert "sample t: localizer grid 6x5 index 0 also used by sample s" in text
    assert "sample u: column 'positions_mm' must be (1, 2, 2)" in text
    assert "sample v: columns ['positions_mm'] are set but 'localizer_grid' is null" in text
    assert "sample w: column 'sha256' has no valid digest for 'localizer'" in text
    assert "sample w: column 'localizer_spacing_mm' must hold 2 positive numbers" in text
