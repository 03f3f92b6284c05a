"""Corpus.attach: en-face arrays written into existing volumes under the journal; a killed writer is undone."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from octssl.corpus.attach import Attachment, read_provenance
from octssl.corpus.store import Corpus
from octssl.errors import SampleError

WRITER = """
import os, sys
import numpy as np
from octssl.corpus.attach import Attachment
from octssl.corpus.store import Corpus

path = sys.argv[1]
corpus = Corpus.open(path)

def die(stage):
    if stage == "written":  # data and provenance written, manifest not yet replaced: tear a shard, then die
        shard = next(p for p in (corpus.zarr_path / "ga").rglob("c/*/*/*") if p.is_file())
        shard.write_bytes(shard.read_bytes()[:30] + b"torn")
        os._exit(9)

Corpus.append_hook = die
corpus.attach([Attachment(i, "ga", np.ones((8, 32), np.uint8)) for i in corpus.ids()])
"""


def files(corpus_dir: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in (corpus_dir / "volumes.zarr").rglob("*") if p.is_file()}


def test_a_killed_attach_is_undone_on_the_next_open(make_corpus, tmp_path: Path) -> None:
    corpus_dir = make_corpus(volumes=6, grid=(8, 32, 32), labelled=0.5)
    before, manifest = files(corpus_dir), (corpus_dir / "manifest.parquet").read_bytes()
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(WRITER), str(corpus_dir)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr
    assert (corpus_dir / ".journal").is_dir()
    corpus = Corpus.open(corpus_dir)  # no writer holds the lock: the journal is rolled back
    assert not (corpus_dir / ".journal").exists()
    assert files(corpus_dir) == before and (corpus_dir / "manifest.parquet").read_bytes() == manifest
    assert corpus.verify() == [] and read_provenance(corpus) == []


def test_attach_replaces_one_array_and_refuses_bad_ones(make_corpus) -> None:
    corpus = Corpus.open(make_corpus(volumes=6, grid=(8, 32, 32), labelled=1.0))
    target = corpus.ids()[2]
    other = {(r["id"], k): corpus.read_array(k, r).tobytes() for r in corpus.rows for k in ("oct", "faf", "ga")}
    mask = np.zeros((8, 32), np.uint8)
    mask[1:3, 4:9] = 1
    assert corpus.attach([Attachment(target, "ga", mask, {"space": "enface", "row": 2})]) == 1
    assert np.array_equal(corpus.read(target)["ga"], mask)
    after = {(r["id"], k): corpus.read_array(k, r).tobytes() for r in corpus.rows for k in ("oct", "faf", "ga")}
    assert {k: v for k, v in after.items() if k != (target, "ga")} == {k: v for k, v in other.items()
                                                                      if k != (target, "ga")}
    (prov,) = read_provenance(corpus)
    assert prov["id"] == target and prov["space"] == "enface" and prov["row"] == 2
    with pytest.raises(SampleError, match="must be uint8 \\(8, 32\\)"):
        corpus.attach([Attachment(target, "ga", np.zeros((4, 4), np.uint8))])
    with pytest.raises(SampleError, match="0/1 values"):
        corpus.attach([Attachment(target, "rpd", np.full((8, 32), 255, np.uint8))])
    with pytest.raises(SampleError, match="cannot attach 'oct'"):
        corpus.attach([Attachment(target, "oct", mask)])
    assert corpus.verify() == []
