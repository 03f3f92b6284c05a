"""Manifest parts: an append writes its own rows (a part), parts are merged and folded so that they stay few,
a crash in the upkeep loses nothing, and a corpus without parts reads (and versions) as before."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from octssl.corpus import manifest as mf
from octssl.corpus import parts
from octssl.corpus.store import Corpus, corpus_version
from octssl.errors import CorpusError


def item(i: int) -> dict:
    rng = np.random.default_rng(i)
    return {"id": f"v{i:03d}", "oct": rng.integers(0, 256, (4, 8, 8), dtype=np.uint8),
            "meta": {"patient": f"p{i % 5}", "eye": "OD", "visit": i, "device": "test", "scan_pattern": "raster",
                     "spacing_mm": (0.1, 0.005, 0.02)}}


def appended(path: Path, batches: list[int]) -> Corpus:
    """A corpus at ``path`` that took one append per entry of ``batches`` (that many volumes each)."""
    corpus, start = Corpus.create(path), 0
    for size in batches:
        corpus.append([item(i) for i in range(start, start + size)], progress=False)
        start += size
    return corpus


def part_files(path: Path) -> list[str]:
    directory = path / parts.PARTS_DIR
    return sorted(p.name for p in directory.glob("*.parquet")) if directory.is_dir() else []


def test_appends_write_parts_that_stay_few_and_keep_every_row_in_order(tmp_path: Path) -> None:
    corpus = appended(tmp_path / "c", [3])  # the base: 3 rows (the first append folds into the empty base)
    base = (tmp_path / "c" / mf.MANIFEST_NAME).read_bytes()
    corpus.append([item(3)], progress=False)
    assert (tmp_path / "c" / mf.MANIFEST_NAME).read_bytes() == base  # the append did not rewrite the manifest
    assert part_files(tmp_path / "c") == ["000000000002-000000000002.parquet"]
    for i in range(4, 40):
        corpus.append([item(i)], progress=False)
        assert len(part_files(tmp_path / "c")) <= 6  # O(log) parts, merged as a binary counter
    reopened = Corpus.open(tmp_path / "c")
    assert reopened.ids(raster_only=False) == [f"v{i:03d}" for i in range(40)] == corpus.ids(raster_only=False)
    assert reopened.verify() == [] and reopened.settings["format"] == mf.FORMAT_VERSION
    assert reopened.row("v039")["index"] == 39 and "v040" not in reopened


def test_the_version_changes_with_each_append_and_is_the_manifest_sha256_without_parts(tmp_path: Path) -> None:
    path = tmp_path / "c"
    appended(path, [4])
    assert corpus_version(path) == hashlib.sha256((path / mf.MANIFEST_NAME).read_bytes()).hexdigest()
    versions = {corpus_version(path)}
    corpus = Corpus.open(path)
    for i in range(4, 7):
        corpus.append([item(i)], progress=False)
        versions.add(corpus.version)
    assert len(versions) == 4 and corpus_version(path) == corpus.version


def test_a_crash_in_the_upkeep_leaves_the_same_rows(tmp_path: Path) -> None:
    path = tmp_path / "c"
    corpus = appended(path, [8, 1, 1])  # base 8 rows, parts 2..3 merged into one part "2-3"
    before = Corpus.open(path).ids(raster_only=False)
    merged = part_files(path)
    assert merged == ["000000000002-000000000003.parquet"]
    # a merge that wrote its output but was killed before deleting its inputs: the inputs are ignored
    committed = parts.read(path)
    for number, table in ((2, committed.parts[0].table.slice(0, 1)), (3, committed.parts[0].table.slice(1, 1))):
        pq.write_table(table, path / parts.PARTS_DIR / f"{number:012d}-{number:012d}.parquet")
    assert Corpus.open(path).ids(raster_only=False) == before
    # a fold that wrote the new base but was killed before deleting the parts: the base's parts_through covers them
    saved = path / "saved"
    shutil.copytree(path / parts.PARTS_DIR, saved)
    parts.fold(path)
    assert part_files(path) == []
    shutil.copytree(saved, path / parts.PARTS_DIR, dirs_exist_ok=True)
    assert Corpus.open(path).ids(raster_only=False) == before
    corpus = Corpus.open(path)
    corpus.append([item(10)], progress=False)  # numbering goes on after the folded parts; leftovers go
    assert Corpus.open(path).ids(raster_only=False) == [*before, "v010"]
    assert part_files(path) == ["000000000004-000000000004.parquet"]


def test_a_missing_part_is_reported_not_skipped(tmp_path: Path) -> None:
    path = tmp_path / "c"
    appended(path, [8, 2, 1])  # parts "2-2" (2 rows) and "3-3" (1 row): not merged
    assert part_files(path) == ["000000000002-000000000002.parquet", "000000000003-000000000003.parquet"]
    (path / parts.PARTS_DIR / "000000000002-000000000002.parquet").unlink()
    with pytest.raises(CorpusError, match=r"manifest.parts: appends 2..2 are missing"):
        Corpus.open(path)


def test_a_manifest_of_a_newer_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c"
    appended(path, [2])
    table = pq.read_table(path / mf.MANIFEST_NAME)
    settings = {**mf.settings_of(table), "format": mf.FORMAT_VERSION + 1}
    pq.write_table(mf.with_settings(table, settings), path / mf.MANIFEST_NAME)
    with pytest.raises(CorpusError, match=r"manifest.parquet: written in corpus format \d+ by a newer octssl"):
        Corpus.open(path)


def test_rows_are_made_on_demand_and_compare_like_a_list(tmp_path: Path) -> None:
    corpus = appended(tmp_path / "c", [5, 1])
    rows = corpus.rows
    assert len(rows) == 6 and rows[-1]["id"] == "v005" and [r["id"] for r in rows[1:3]] == ["v001", "v002"]
    assert rows == corpus.manifest.to_pylist() and rows != rows[:5]
    assert corpus.column("visit", ["v004", "v001"]) == [4, 1]
    assert corpus.patient_split("p1") == corpus.row("v001")["split"] and corpus.patient_split("nobody") is None
    with pytest.raises(IndexError):
        rows[6]
