"""A published corpus has the version of the local corpus it was published from (the same manifest bytes)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from octssl.corpus.publish import publish
from octssl.corpus.synth import synthesize
from octssl.data.version import corpus_version


def test_a_published_corpus_keeps_its_version(s3: str, tmp_path: Path) -> None:
    corpus = synthesize(tmp_path / "corpus", volumes=3, grid=(8, 32, 32))
    publish(corpus.path, s3, progress=False)
    local = hashlib.sha256(corpus.manifest_path.read_bytes()).hexdigest()
    assert corpus_version(s3) == {"manifest_sha256": local, "corpus": s3, "shards": None}
