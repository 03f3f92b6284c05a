"""`octssl verify URL`: a published corpus is verified as a corpus, a shard prefix as shards, and a prefix
holding neither is refused in one line saying what was expected there."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from octssl.cli import app
from octssl.corpus import publish as pub
from octssl.corpus.store import Corpus
from octssl.webds.export import export_shards

from .conftest import damage_first_oct_shard


def test_verify_a_published_corpus_url_finds_a_corrupt_object(make_corpus, s3: str) -> None:
    url = f"{s3}/corpus"
    local = make_corpus(volumes=6)
    pub.publish(local, url, progress=False)
    ok = CliRunner().invoke(app, ["verify", url])
    assert ok.exit_code == 0 and f"ok {url}" in ok.output, ok.output
    assert Corpus.open(url).verify() == Corpus.open(local).verify() == []

    shard = damage_first_oct_shard(url)
    bad = CliRunner().invoke(app, ["verify", url])
    assert bad.exit_code == 1 and str(shard) in bad.output and "verify failed" in bad.output, bad.output


def test_verify_a_shard_url_and_an_empty_prefix(tiny_corpus: Path, s3: str) -> None:
    export_shards(tiny_corpus, f"{s3}/shards", samples_per_shard=8, progress=False)
    ok = CliRunner().invoke(app, ["verify", f"{s3}/shards"])
    assert ok.exit_code == 0 and f"ok {s3}/shards" in ok.output, ok.output

    empty = CliRunner().invoke(app, ["verify", f"{s3}/empty"])
    lines = empty.output.strip().splitlines()
    assert empty.exit_code == 1 and len(lines) == 1, empty.output
    assert f"{s3}/empty" in lines[0] and "index.json" in lines[0] and "manifest.parquet" in lines[0], lines[0]
