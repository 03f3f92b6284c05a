"""Publishing a corpus to an object store: data first, verified through the remote read path, manifest last.

A reader opens a published corpus by its ``manifest.parquet``, so uploading the manifest last means a
reader never sees a half-published corpus. Before that, every sample is read back from the object store
(``Corpus.open`` on the URL, the same range reads training uses) and checked against the manifest's
sha256. Progress is kept in a ledger object at the destination (``.octssl-publish.json``: the files
uploaded so far with their size and sha256), so a publish interrupted at any point resumes where it
stopped; the ledger is removed once the manifest is up. The corpus is locked against appends meanwhile.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from octssl.corpus import manifest as mf
from octssl.corpus import parts
from octssl.corpus.backends import ZarrBackend
from octssl.corpus.journal import WriterLock
from octssl.corpus.layout import ZARR_NAME
from octssl.corpus.store import Corpus
from octssl.errors import CorpusError, StorageError
from octssl.observe.progress import stage
from octssl.storage.location import Location

LEDGER_NAME = ".octssl-publish.json"
LEDGER_EVERY_BYTES = 256 * 2**20  # the ledger is rewritten after this many uploaded bytes (and at the end)


def publish(corpus_path: str | Path, url: str | Location, *, progress: bool = True) -> dict[str, Any]:
    """Upload the local corpus at ``corpus_path`` to ``url`` (e.g. ``s3://bucket/corpora/amd``); returns
    counts. Publishing the same corpus again is a no-op; a destination holding another corpus is refused."""
    dest = Location.parse(url)
    if not dest.remote:
        raise StorageError(f"{url}: publish needs an object-store URL (s3://BUCKET/PREFIX)")
    corpus = Corpus.open(corpus_path)
    with WriterLock(corpus.folder):
        parts.fold(corpus.folder)  # readers of the published corpus read one manifest.parquet
    local_sha = _sha256(corpus.manifest_path)
    if (dest / mf.MANIFEST_NAME).exists():
        if _sha256(dest / mf.MANIFEST_NAME) == local_sha:
            return {"samples": len(corpus), "files": 0, "uploaded_bytes": 0, "skipped": 0, "already": True}
        raise CorpusError(f"{dest}: already holds a published corpus with another manifest; publish to a new "
                          "prefix (readers of the old one would see it change)")
    with WriterLock(corpus.folder):
        parts.fold(corpus.folder)  # again: an append may have committed since
        corpus = Corpus.open(corpus_path)  # the committed state under the lock
        files = [p for p in sorted((corpus.folder / ZARR_NAME).rglob("*")) if p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(corpus.path).parts)]
        ledger = _load_ledger(dest)
        uploaded = skipped = since = 0
        with stage(f"publish {corpus.path.name}", len(files), progress) as advance:
            for path in files:
                name = path.relative_to(corpus.path).as_posix()
                size, digest = path.stat().st_size, _sha256(path)
                target = dest / name
                if ledger.get(name) == [size, digest] and target.is_file() and target.size() == size:
                    skipped += 1
                else:
                    target.upload(path)
                    ledger[name] = [size, digest]
                    uploaded, since = uploaded + size, since + size
                    if since >= LEDGER_EVERY_BYTES:
                        (dest / LEDGER_NAME).write_bytes(json.dumps(ledger).encode())
                        since = 0
                advance()
        (dest / LEDGER_NAME).write_bytes(json.dumps(ledger).encode())
        _verify_remote(dest, corpus, progress)
        (dest / mf.MANIFEST_NAME).upload(corpus.folder / mf.MANIFEST_NAME)
        if _sha256(dest / mf.MANIFEST_NAME) != local_sha:
            raise CorpusError(f"{dest / mf.MANIFEST_NAME}: differs from {corpus.manifest_path} after upload")
        (dest / LEDGER_NAME).delete()
    return {"samples": len(corpus), "files": len(files), "uploaded_bytes": uploaded, "skipped": skipped,
            "already": False}


def _verify_remote(dest: Location, corpus: Corpus, progress: bool) -> None:
    """Read every sample back from ``dest`` (before its manifest exists) and check every array's sha256."""
    remote = Corpus(ZarrBackend(dest), corpus.manifest)
    with stage("verify upload", len(corpus), progress) as advance:
        for row in corpus.rows:
            try:
                remote.read(row["id"], verify=True, localizer=True)
            except CorpusError as err:
                raise CorpusError(f"{dest}: upload check failed, publish again to repair: {err}") from err
            advance()


def _load_ledger(dest: Location) -> dict[str, list]:
    try:
        ledger = json.loads((dest / LEDGER_NAME).read_bytes())
    except FileNotFoundError:
        return {}
    except ValueError:
        return {}  # a damaged ledger only costs re-uploading
    return ledger if isinstance(ledger, dict) else {}


def _sha256(path: Path | Location) -> str:
    digest = hashlib.sha256()
    with Location.parse(path).open_input() as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
