"""The corpus version a run reads, for its summary (:func:`octssl.corpus.store.corpus_version`).

The manifest holds every array's sha256, so its own sha256 pins the data to the byte: two runs with the same
``manifest_sha256`` read the same volumes, and an append changes it. A run fed from WebDataset shards reads
the version its shards were exported from (``index.json`` records that corpus's manifest sha256); when it
also reads a corpus (for validation), that corpus's current version is recorded beside it, so a corpus
appended after the export shows as two different digests. A corpus published with ``octssl publish
--icechunk`` also records ``snapshot_id``: the icechunk snapshot read (``data.corpus=URL@SNAPSHOT_ID`` reads
that one again).
"""

from __future__ import annotations

from typing import Any

from octssl.corpus.repository import version_of
from octssl.corpus.store import corpus_version as version_digest
from octssl.webds.index import read_index


def corpus_version(corpus: str | None, shards: str | None = None) -> dict[str, Any]:
    """``{"manifest_sha256", "corpus", "shards"[, "corpus_manifest_sha256"][, "snapshot_id"]}`` of a run that trains from
    ``shards`` (a shard directory or URL) when given, else from ``corpus``; None values where nothing is read."""
    if shards is None:
        snapshot = version_of(corpus) if corpus else None
        if snapshot is not None:
            return {**snapshot, "corpus": corpus, "shards": None}
        return {"manifest_sha256": version_digest(corpus) if corpus else None, "corpus": corpus, "shards": None}
    exported = read_index(shards).get("corpus") or {}
    version = {"manifest_sha256": exported.get("manifest_sha256"), "corpus": corpus, "shards": shards}
    if corpus:
        snapshot = version_of(corpus)
        version["corpus_manifest_sha256"] = snapshot["manifest_sha256"] if snapshot else version_digest(corpus)
        if snapshot:
            version["corpus_snapshot_id"] = snapshot["snapshot_id"]
    return version
