"""A pretraining run's summary.json records the corpus version it read, and an append changes it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from octssl.corpus.store import Corpus
from octssl.corpus.synth import samples
from octssl.train.launch import run_single_process

from .conftest import GRID


def test_pretrain_summary_records_the_corpus_manifest_sha256(job, train_corpus: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(train_corpus, corpus)  # the session corpus stays as it is for the other tests
    manifest = corpus / "manifest.parquet"
    first = run_single_process(job("pretrain.yaml", "run.name=v1", f"data.corpus={corpus}", "run.max_steps=2"))
    on_disk = json.loads((tmp_path / "runs" / "v1" / "summary.json").read_text())
    assert on_disk["corpus_version"] == first.corpus_version == {
        "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(), "corpus": str(corpus), "shards": None}
    Corpus.open(corpus).append(samples(1, GRID, seed=11, labelled=1.0), progress=False)
    second = run_single_process(job("pretrain.yaml", "run.name=v2", f"data.corpus={corpus}", "run.max_steps=2"))
    assert second.corpus_version["manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert second.corpus_version["manifest_sha256"] != first.corpus_version["manifest_sha256"]


def test_a_run_on_an_icechunk_corpus_reads_and_records_one_snapshot(job, train_corpus: Path, tmp_path: Path) -> None:
    from octssl.corpus.icechunk import publish

    repo = tmp_path / "repo"
    published = publish(train_corpus, repo, progress=False)
    done = run_single_process(job("pretrain.yaml", "run.name=ice", f"data.corpus={repo}", "run.max_steps=2"))
    assert done.corpus_version == {
        "manifest_sha256": hashlib.sha256((train_corpus / "manifest.parquet").read_bytes()).hexdigest(),
        "snapshot_id": published["snapshot_id"], "corpus": f"{repo}@{published['snapshot_id']}", "shards": None}
