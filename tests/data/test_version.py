"""The corpus version a run records: the manifest's sha256, from the corpus or from the shards' index."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from octssl.corpus.manifest import MANIFEST_NAME
from octssl.corpus.store import Corpus
from octssl.corpus.synth import samples, synthesize
from octssl.data.version import corpus_version
from octssl.errors import CorpusError
from octssl.webds.export import export_shards

GRID = (8, 32, 32)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_corpus_version_is_its_manifest_sha256_and_an_append_changes_it(tmp_path: Path) -> None:
    """Without manifest parts the version is the manifest's sha256 (as before parts); an append leaves a part."""
    corpus = synthesize(tmp_path / "corpus", volumes=4, grid=GRID)
    before = corpus_version(str(corpus.path))
    assert before == {"manifest_sha256": _sha(corpus.manifest_path), "corpus": str(corpus.path), "shards": None}
    corpus.append(samples(1, GRID, seed=7, labelled=0.0), progress=False)
    after = corpus_version(str(corpus.path))
    assert after["manifest_sha256"] == Corpus.open(corpus.path).version != before["manifest_sha256"]
    assert (corpus.path / "manifest.parts").is_dir() and _sha(corpus.manifest_path) == before["manifest_sha256"]


def test_a_shard_run_records_the_exported_version_beside_the_corpus_it_validates_on(tmp_path: Path) -> None:
    corpus = synthesize(tmp_path / "corpus", volumes=4, grid=GRID)
    exported = _sha(corpus.manifest_path)
    export_shards(corpus, tmp_path / "shards", progress=False)
    version = corpus_version(str(corpus.path), str(tmp_path / "shards"))
    assert version["manifest_sha256"] == version["corpus_manifest_sha256"] == exported
    Corpus.open(corpus.path).append(samples(1, GRID, seed=7, labelled=0.0), progress=False)
    version = corpus_version(str(corpus.path), str(tmp_path / "shards"))
    assert version["manifest_sha256"] == exported  # the shards still hold the exported volumes
    assert version["corpus_manifest_sha256"] == Corpus.open(corpus.path).version != exported
    assert corpus_version(None, str(tmp_path / "shards"))["manifest_sha256"] == exported


def test_no_corpus_no_version_and_a_missing_manifest_is_named(tmp_path: Path) -> None:
    assert corpus_version(None)["manifest_sha256"] is None
    with pytest.raises(CorpusError, match=f"{tmp_path / MANIFEST_NAME}: manifest is missing"):
        corpus_version(str(tmp_path))
