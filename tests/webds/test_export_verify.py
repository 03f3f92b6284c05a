"""export_shards / verify_shards / `octssl export-shards`: format, checksums and every damaged-shard case."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from typer.testing import CliRunner

from octssl.cli import app
from octssl.corpus.store import Corpus
from octssl.errors import ShardError
from octssl.webds.export import export_shards
from octssl.webds.index import INDEX_NAME, META_KEYS
from octssl.webds.verify import verify_shards


def _index(path: Path) -> dict:
    return json.loads((path / INDEX_NAME).read_text())


def test_export_writes_balanced_shards_and_index(tiny_corpus: Path, shards: Path):
    corpus = Corpus.open(tiny_corpus)
    index = _index(shards)
    counts = [s["count"] for s in index["shards"]]
    assert [s["name"] for s in index["shards"]] == [f"shard-{i:06d}.tar" for i in range(5)]
    assert sum(counts) == index["total"] == len(corpus.ids()) == 24
    assert max(counts) - min(counts) <= 1
    assert sorted(sid for s in index["shards"] for sid in s["ids"]) == sorted(corpus.ids())
    for shard in index["shards"]:
        assert (shards / shard["name"]).stat().st_size == shard["bytes"]
    for sid, entry in index["samples"].items():
        row = corpus.row(sid)
        assert entry["sha256"] == {k: row["sha256"][k] for k in [*row["modalities"], *row["labels"]]}
        assert entry["split"] == row["split"]
    assert not list(shards.glob(".*tmp"))


def test_webdataset_reads_the_shards_back_exactly(tiny_corpus: Path, shards: Path):
    corpus = Corpus.open(tiny_corpus)
    urls = [str(p) for p in sorted(shards.glob("shard-*.tar"))]
    pipeline = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node).decode("l8")
    seen = 0
    for record in pipeline:
        sample = corpus.read(record["__key__"])
        assert record["oct.npy"].dtype == np.uint8
        np.testing.assert_array_equal(record["oct.npy"], sample["oct"])
        for key in ("faf", "slo", "ga", "rpd"):
            assert (f"{key}.png" in record) == (key in sample)
            if key in sample:
                assert record[f"{key}.png"].dtype == np.uint8
                np.testing.assert_array_equal(record[f"{key}.png"], sample[key])  # masks keep exact 0/1
        meta = record["json"]
        assert set(meta) == set(META_KEYS)
        assert "acquired" not in meta and "source" not in meta  # no date, no link to the device file
        assert meta["patient"] == sample["meta"]["patient"]
        seen += 1
    assert seen == 24


def test_export_is_byte_reproducible_and_filters_a_split(tiny_corpus: Path, shards: Path, tmp_path: Path):
    again = export_shards(tiny_corpus, tmp_path / "again", samples_per_shard=5, progress=False)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in _index(shards)["shards"]]
    train = export_shards(tiny_corpus, tmp_path / "train", samples_per_shard=4, split="train", progress=False)
    corpus = Corpus.open(tiny_corpus)
    assert sorted(train["samples"]) == sorted(corpus.ids(split="train"))
    assert {e["split"] for e in train["samples"].values()} == {"train"}


def test_existing_export_needs_overwrite(tiny_corpus: Path, tmp_path: Path):
    export_shards(tiny_corpus, tmp_path / "out", samples_per_shard=12, progress=False)
    with pytest.raises(ShardError, match="already holds an export"):
        export_shards(tiny_corpus, tmp_path / "out", samples_per_shard=12, progress=False)
    index = export_shards(tiny_corpus, tmp_path / "out", samples_per_shard=24, progress=False, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").glob("shard-*.tar")) == ["shard-000000.tar"]
    assert index["shards"][0]["count"] == 24


def test_clean_export_verifies(shards: Path):
    assert verify_shards(shards) == []


def test_verify_reports_every_damage_in_one_pass(damaged: Path):
    index = _index(damaged)
    truncated, corrupt, missing = (damaged / s["name"] for s in index["shards"][:3])
    # truncate the first shard mid-way through its third sample
    third = index["samples"][index["shards"][0]["ids"][2]]
    with open(truncated, "r+b") as handle:
        handle.truncate(third["offset"] + third["size"] // 2)
    # flip one voxel byte of the second sample of the second shard
    victim = index["shards"][1]["ids"][1]
    entry = index["samples"][victim]
    with open(corrupt, "r+b") as handle:
        handle.seek(entry["offset"] + 512 + 128 + 1000)  # tar header + npy header + a voxel
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))
    missing.unlink()

    problems = verify_shards(damaged)
    text = "\n".join(problems)
    assert f"{truncated}: truncated tar" in text
    assert f"{truncated}: holds 2 samples, index says 5" in text
    for sid in index["shards"][0]["ids"][2:]:
        assert f"{truncated}: sample {sid}: missing from the tar" in text
    assert f"{corrupt}: tar sha256 mismatch" in text
    assert f"{corrupt}: sample {victim}: 'oct' sha256 mismatch" in text
    assert f"{missing}: missing" in text
    intact = [damaged / s["name"] for s in index["shards"][3:]]
    assert not any(str(p) in text for p in intact)


def test_verify_without_index_says_so(tmp_path: Path):
    assert verify_shards(tmp_path) == [f"{tmp_path / INDEX_NAME}: missing (not a shard directory, or the export did not finish)"]


def test_ids_with_dots_are_refused(tmp_path: Path):
    corpus = Corpus.create(tmp_path / "c")
    meta = {"patient": "p1", "eye": "OD", "visit": 0, "device": "x", "scan_pattern": "raster",
            "spacing_mm": (0.1, 0.01, 0.1), "split": "train"}
    corpus.append([{"id": "scan.v1", "oct": np.zeros((4, 8, 8), np.uint8), "meta": meta}], progress=False)
    with pytest.raises(ShardError, match="scan.v1"):
        export_shards(tmp_path / "c", tmp_path / "s", progress=False)


def test_cli_export_shards(tiny_corpus: Path, tmp_path: Path):
    runner = CliRunner()
    result = runner.invoke(app, ["export-shards", str(tiny_corpus), "--out", str(tmp_path / "s"),
                                 "--samples-per-shard", "10", "--split", "train"])
    assert result.exit_code == 0, result.output
    index = _index(tmp_path / "s")
    assert index["split"] == "train" and index["samples_per_shard"] == 10
    with tarfile.open(tmp_path / "s" / "shard-000000.tar") as tar:
        assert any(name.endswith(".oct.npy") for name in tar.getnames())
    failed = runner.invoke(app, ["export-shards", str(tmp_path / "nowhere"), "--out", str(tmp_path / "t")])
    assert failed.exit_code == 1
    assert "nowhere" in failed.output


def test_parallel_export_is_byte_identical_and_both_commands_show_plain_progress(
        tiny_corpus: Path, shards: Path, tmp_path: Path):
    """`octssl export-shards --workers 3` (processes writing different tars) gives the very bytes of the
    one-process export, index.json included; with stderr not a terminal, export and verify print progress
    lines at the cadence OCTSSL_PROGRESS_EVERY sets and a final one."""
    octssl = Path(sys.executable).parent / "octssl"
    env = {**os.environ, "OCTSSL_PROGRESS_EVERY": "0.05"}
    out = tmp_path / "parallel"
    done = subprocess.run([str(octssl), "export-shards", str(tiny_corpus), "--out", str(out), "-k", "5",
                           "--workers", "3"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in shards.iterdir())
    for path in shards.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name
    lines = [line for line in done.stderr.splitlines() if line.startswith(f"export {tiny_corpus.name}: ")]
    assert lines and lines[-1].startswith(f"export {tiny_corpus.name}: 24/24 (100%)"), done.stderr
    checked = subprocess.run([str(octssl), "verify", str(out)], capture_output=True, text=True, env=env,
                             timeout=300)
    assert checked.returncode == 0, checked.stderr
    assert f"verify {out.name}: 24/24 (100%)" in checked.stderr


def test_fast_header_parser_matches_tarfile_and_rejects_a_bad_header(shards: Path):
    from octssl.webds.read import _split_members_tarfile, split_members

    index = _index(shards)
    sid = index["shards"][0]["ids"][0]
    entry = index["samples"][sid]
    with open(shards / entry["shard"], "rb") as handle:
        handle.seek(entry["offset"])
        chunk = bytearray(handle.read(entry["size"]))
    fast, slow = split_members(chunk, "x"), _split_members_tarfile(chunk, "x")
    assert list(fast) == list(slow) == [sid]
    assert {k: bytes(v) for k, v in fast[sid].items()} == {k: bytes(v) for k, v in slow[sid].items()}
    chunk[136] ^= 0x01  # inside the first record's mtime field: the header checksum no longer holds
    with pytest.raises(ShardError, match="header checksum mismatch"):
        split_members(chunk, "x")
