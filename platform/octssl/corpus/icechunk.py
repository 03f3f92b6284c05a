"""Publishing a local corpus into a transactional icechunk repository (``octssl publish --icechunk``).

Each publish is one icechunk commit on branch ``main``: the first writes every array, later ones only the
rows (and arrays) the published snapshot lacks, plus the new manifest (the repository's layout:
``octssl.corpus.repository``, which also reads it back). A commit is atomic, so a reader sees the old
snapshot or the new one, never half of a publish; an interrupted publish commits nothing and is simply run
again. The names a reader needs (``is_repository``, ``split_snapshot``, ``pinned``, ``version_of``) are
re-exported here.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.sync import sync as zarr_sync

from octssl import __version__
from octssl.corpus import manifest as mf
from octssl.corpus import parts
from octssl.corpus.journal import WriterLock
from octssl.corpus.layout import array_path, present, slot
from octssl.corpus.repository import (
    BRANCH,
    MANIFEST_ARRAY,
    IcechunkBackend,
    icechunk_library,
    is_repository,
    open_repository,
    pinned,
    split_snapshot,
    version_of,
)
from octssl.corpus.store import Corpus
from octssl.corpus.writer import ZSTD_LEVEL
from octssl.errors import CorpusError
from octssl.observe.progress import stage
from octssl.storage.location import Location

__all__ = ["is_repository", "pinned", "publish", "split_snapshot", "version_of"]

WRITE_BATCH = 16  # chunk uploads in flight at once while publishing


def publish(corpus_path: str | Path, url: str | Location, *, progress: bool = True) -> dict[str, Any]:
    """Commit the local corpus at ``corpus_path`` to the icechunk repository at ``url`` (created when the
    prefix or folder is empty): the arrays the published snapshot lacks and the manifest, in one commit.
    Returns counts and the new snapshot id. A repository holding another corpus is refused, and so is a
    non-empty prefix that is not an icechunk repository."""
    where, snapshot = split_snapshot(url)
    if snapshot is not None:
        raise CorpusError(f"{url}: publish writes to a repository's branch main, not to a snapshot (drop @{snapshot})")
    corpus = Corpus.open(corpus_path)
    with WriterLock(corpus.folder):
        parts.fold(corpus.folder)  # the snapshot stores one manifest.parquet
        corpus = Corpus.open(corpus_path)  # the committed state under the lock
        manifest = Path(corpus.folder / mf.MANIFEST_NAME).read_bytes()
        sha = hashlib.sha256(manifest).hexdigest()
        if is_repository(where):
            published = Corpus.open(where)
            if published.version == sha:
                return {"samples": len(corpus), "arrays": 0, "snapshot_id": published.snapshot_id, "already": True}
            repo, todo = open_repository(where), _missing_arrays(where, published, corpus)
        else:
            if where.files():
                raise CorpusError(f"{where}: not empty and not an icechunk repository; publish to an empty prefix")
            repo, todo = open_repository(where, create=True), [(row, key) for row in corpus.rows
                                                            for key in sorted(present(row))]
        session = repo.writable_session(BRANCH)
        _write_arrays(session, corpus, todo, progress)
        _write_manifest(session, manifest, sha)
        written = IcechunkBackend(where, session, manifest)
        _verify_written(Corpus(written, written.manifest()), todo, progress)
        message = f"octssl {__version__} publish: {len(corpus)} samples, manifest sha256 {sha}"
        ic = icechunk_library()
        try:
            snapshot = session.commit(message, metadata={"octssl_version": __version__, "manifest_sha256": sha,
                                                         "samples": len(corpus)})
        except ic.ConflictError as err:
            raise CorpusError(f"{where}: another publish committed first; nothing of this one was committed, "
                              f"publish again ({err})") from None
    return {"samples": len(corpus), "arrays": len(todo), "snapshot_id": str(snapshot), "already": False}


def _missing_arrays(where: Location, published: Corpus, corpus: Corpus) -> list[tuple[dict[str, Any], str]]:
    """(row, key) of every array of ``corpus`` that ``published`` lacks; CorpusError when ``published`` holds a
    row ``corpus`` does not, or an array stored at another slot or with another checksum (another corpus)."""
    before = {row["id"]: row for row in published.rows}
    gone = [sid for sid in before if sid not in corpus]
    if gone:
        raise CorpusError(f"{where}: holds another corpus (sample {gone[0]} is not in "
                          f"{corpus.path}); publish to a new URL")
    todo = []
    for row in corpus.rows:
        old = before.get(row["id"])
        for key in sorted(present(row)):
            if old is None or key not in present(old):
                todo.append((row, key))
            elif slot(key, old) != slot(key, row) or old["sha256"][key] != row["sha256"][key]:
                raise CorpusError(f"{where}: holds another corpus (sample {row['id']}: '{key}' "
                                  f"differs from {corpus.path}); publish to a new URL")
    return todo


def _write_arrays(session: Any, corpus: Corpus, todo: list[tuple[dict[str, Any], str]], progress: bool) -> None:
    """Create or grow every array to the local one's shape (one chunk per slot; the local writer grows all
    the arrays of a grid together, also those a new row lacks), then write ``todo``'s arrays."""
    arrays: dict[str, Any] = {}
    for key, grid in sorted({(key, slot(key, row)[0]) for row in corpus.rows for key in present(row)}):
        local, name = corpus.array(key, grid), array_path(key, grid)
        try:
            arr = zarr.open_array(session.store, path=name, mode="r+")
            if arr.shape[0] < local.shape[0]:
                arr.resize(local.shape)
        except (FileNotFoundError, zarr.errors.NodeNotFoundError):
            arr = zarr.create_array(session.store, name=name, shape=local.shape, dtype="uint8",
                                    chunks=(1, *local.shape[1:]), fill_value=0,
                                    compressors=ZstdCodec(level=ZSTD_LEVEL, checksum=True),
                                    config={"write_empty_chunks": False})
        arrays[name] = arr.async_array
    with stage(f"publish {Path(corpus.folder).name} (icechunk)", len(todo), progress) as advance:
        for start in range(0, len(todo), WRITE_BATCH):
            batch = todo[start:start + WRITE_BATCH]
            writes = [(arrays[array_path(key, slot(key, row)[0])], slot(key, row)[1], corpus.read_array(key, row))
                      for row, key in batch]

            async def put(writes: list[tuple[Any, int, np.ndarray]] = writes) -> None:
                await asyncio.gather(*(arr.setitem(index, data) for arr, index, data in writes))

            zarr_sync(put())
            advance(len(batch))


def _write_manifest(session: Any, manifest: bytes, sha: str) -> None:
    arr = zarr.create_array(session.store, name=MANIFEST_ARRAY, shape=(len(manifest),), dtype="uint8",
                            chunks=(len(manifest),), compressors=None, fill_value=0, overwrite=True,
                            attributes={"sha256": sha, "octssl_version": __version__})
    arr[:] = np.frombuffer(manifest, np.uint8)


def _verify_written(written: Corpus, todo: Iterable[tuple[dict[str, Any], str]], progress: bool) -> None:
    """Read every array just written back from the object store (before the commit) and check its sha256."""
    todo = list(todo)
    with stage("verify upload", len(todo), progress) as advance:
        for row, key in todo:
            try:
                written.read_array(key, row)
            except CorpusError as err:
                raise CorpusError(f"upload check failed, nothing was committed; publish again: {err}") from err
            advance()
