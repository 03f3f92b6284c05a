"""icechunk corpora: publish a local corpus into a transactional icechunk repository; read one at a snapshot.

An icechunk repository (``s3://BUCKET/PREFIX`` or a local folder) holds the corpus's arrays under the same
paths as its ``volumes.zarr`` (``oct/<grid>``, ``faf/<grid>``, ..., ``localizer/<H>x<W>``) with one object
per volume (chunk = one slot, no sharding codec, zstd with a content checksum, as the corpus uses), and the
corpus's ``manifest.parquet`` bytes, unchanged, as the 1-D uint8 array ``manifest.parquet`` (one
uncompressed chunk). Each publish is one icechunk commit on branch ``main``: the first writes every array,
later ones only the rows (and arrays) the published snapshot lacks, plus the new manifest. A commit is
atomic, so a reader sees the old snapshot or the new one, never half of a publish; an interrupted publish
commits nothing and is simply run again.

``Corpus.open("URL")`` reads the tip of ``main``; ``Corpus.open("URL@SNAPSHOT_ID")`` reads that snapshot
(the 20-character id a publish prints and a run's summary records). Every array is read by one ``get`` of
its chunk key and a zstd decode, and checked against the manifest's sha256. ``icechunk`` is imported here
only, and only when a repository is used.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import zarr
from numcodecs.zstd import Zstd
from zarr.codecs import ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync as zarr_sync

from octssl import __version__
from octssl.corpus import manifest as mf
from octssl.corpus.layout import array_path, present, slot
from octssl.corpus.store import Corpus
from octssl.errors import CorpusError, StorageError
from octssl.observe.progress import stage
from octssl.storage.location import Location, storage_error

BRANCH = "main"
MANIFEST_ARRAY = mf.MANIFEST_NAME  # the manifest's bytes, as a 1-D uint8 array at the repository's root
_SNAPSHOT = re.compile(r"^(.+)@([0-9A-HJKMNP-TV-Z]{20})$")  # icechunk ids: 20 Crockford base32 characters
WRITE_BATCH = 16  # chunk uploads in flight at once while publishing


def split_snapshot(value: str | Path | Location) -> tuple[Location, str | None]:
    """``URL@SNAPSHOT_ID`` -> (the repository's Location, the id); anything else -> (its Location, None)."""
    match = _SNAPSHOT.match(str(value))
    if match is None:
        return Location.parse(value), None
    return Location.parse(match.group(1)), match.group(2)


def is_repository(where: Location) -> bool:
    """Whether ``where`` holds an icechunk repository (its branch ``main`` exists)."""
    return (where / "refs" / f"branch.{BRANCH}" / "ref.json").is_file()


def _icechunk() -> Any:
    import icechunk

    icechunk.set_logs_filter("error")  # its one warning: local storage is unsafe for concurrent commits
    return icechunk


def storage_of(where: Location) -> Any:
    """icechunk's Storage for a local folder or an ``s3://`` URL, from the standard AWS_* variables only."""
    ic = _icechunk()
    if not where.remote:
        return ic.local_filesystem_storage(str(where.local.absolute()))
    if where.scheme != "s3":
        raise StorageError(f"{where}: icechunk corpora live in a local folder or at an s3:// URL")
    bucket, _, prefix = where.path.partition("/")
    env = {key: os.environ.get(key) for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                "AWS_SESSION_TOKEN", "AWS_REGION")}
    options: dict[str, Any] = {"bucket": bucket, "prefix": prefix or None, "region": env["AWS_REGION"] or "us-east-1"}
    if endpoint := env["AWS_ENDPOINT_URL"]:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise StorageError(f"AWS_ENDPOINT_URL={endpoint!r}: expected http(s)://HOST[:PORT]")
        options.update(endpoint_url=f"{parts.scheme}://{parts.netloc}", allow_http=parts.scheme == "http",
                       force_path_style=True)
    if env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]:
        options.update(access_key_id=env["AWS_ACCESS_KEY_ID"], secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                       session_token=env["AWS_SESSION_TOKEN"])
    elif env["AWS_ACCESS_KEY_ID"] or env["AWS_SECRET_ACCESS_KEY"]:
        raise StorageError("set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or neither")
    else:
        options.update(from_env=True)
    return ic.s3_storage(**options)


def _repository(where: Location, create: bool = False) -> Any:
    ic = _icechunk()
    try:
        if create:  # inline threshold 0: every volume is an object of its own, never inlined in a manifest
            return ic.Repository.create(storage_of(where), ic.RepositoryConfig(inline_chunk_threshold_bytes=0))
        return ic.Repository.open(storage_of(where))
    except ic.IcechunkError as err:
        raise storage_error(where, RuntimeError(_first_line(err))) from None


def _get(store: Any, keys: list[str]) -> list[Any]:
    """The bytes of each key (None when absent; the exception when the read failed), fetched concurrently."""
    prototype = default_buffer_prototype()

    async def fetch() -> list[Any]:
        return await asyncio.gather(*(store.get(key, prototype) for key in keys), return_exceptions=True)

    return [r if r is None or isinstance(r, BaseException) else r.to_bytes() for r in zarr_sync(fetch())]


class IcechunkCorpus(Corpus):
    """A corpus read from an icechunk repository at one snapshot (read-only); ``path`` is ``URL@SNAPSHOT_ID``."""

    def __init__(self, repository: Location, session: Any, manifest: bytes) -> None:
        self.repository, self.session, self.snapshot_id = repository, session, str(session.snapshot_id)
        self.manifest_sha256 = hashlib.sha256(manifest).hexdigest()
        pinned = Location.parse(f"{repository}@{self.snapshot_id}")
        super().__init__(pinned, mf.parse_manifest(manifest, str(pinned / MANIFEST_ARRAY)))
        self.remote = True  # read-only: append says to append locally and publish again
        self.zarr_path = pinned  # the arrays sit at the repository's root
        self._zstd = Zstd()

    @classmethod
    def at(cls, repository: Location, snapshot: str | None = None) -> IcechunkCorpus:
        """The corpus at ``snapshot`` (default: the tip of branch main); CorpusError when there is none."""
        if not is_repository(repository):  # also where wrong keys are reported, naming the bucket
            raise CorpusError(f"{repository}: no icechunk repository here (no branch '{BRANCH}')")
        ic = _icechunk()
        repo = _repository(repository)
        try:
            session = (repo.readonly_session(snapshot_id=snapshot) if snapshot
                       else repo.readonly_session(branch=BRANCH))
        except ic.IcechunkError as err:
            raise CorpusError(f"{repository}@{snapshot or BRANCH}: no such snapshot in this icechunk repository "
                              f"({_first_line(err)})") from None
        return cls(repository, session, read_manifest_bytes(repository, session))

    def _zarr_store(self) -> Any:
        return self.session.store

    def stored_grids(self, key: str) -> list[str]:
        """The grid buckets that hold an array ``key`` in this snapshot."""
        try:
            group = zarr.open_group(self.session.store, path=key, mode="r")
        except (FileNotFoundError, zarr.errors.NodeNotFoundError, zarr.errors.GroupNotFoundError):
            return []
        return sorted(group.array_keys())

    def has_array(self, key: str, grid: str) -> bool:
        try:
            self.array(key, grid)
        except CorpusError:
            return False
        return True

    def _read_arrays(self, keys: list[str], row: dict[str, Any]) -> dict[str, np.ndarray]:
        """One ``get`` per array (all of a row's at once), zstd-decoded and checked against the manifest's sha256;
        CorpusError naming the chunk (the object) and the sample on any failure."""
        chunks, shapes = [], []
        for key in keys:
            grid, index = self.slot(key, row)
            _, arr = self._stored(key, grid, index, row)
            chunks.append(f"{array_path(key, grid)}/c/{index}" + "/0" * (arr.ndim - 1))
            shapes.append(tuple(arr.shape[1:]))
        results = {}
        for key, chunk, shape, data in zip(keys, chunks, shapes, _get(self.session.store, chunks), strict=True):
            where, expected = f"{self.zarr_path}/{chunk}", (row["sha256"] or {}).get(key)
            if isinstance(data, BaseException):  # e.g. the object was deleted: icechunk's first line names it
                raise CorpusError(f"{where}: sample {row['id']}: cannot read '{key}' (object missing or "
                                  f"unreadable): {_first_line(data)}") from data
            if data is None:  # no object: the slot holds the fill value, which only an all-zero array may
                if expected == mf.zeros_sha256(shape):
                    results[key] = np.zeros(shape, np.uint8)
                    continue
                raise CorpusError(f"{where}: sample {row['id']}: the object holding '{key}' is missing")
            try:
                array = np.frombuffer(self._zstd.decode(data), np.uint8).reshape(shape)
            except Exception as err:  # any codec failure means the stored bytes are damaged
                raise CorpusError(f"{where}: sample {row['id']}: cannot decode '{key}' (damaged object): "
                                  f"{err}") from err
            if mf.array_sha256(array) != expected:
                raise CorpusError(f"{where}: sample {row['id']}: '{key}' checksum mismatch (damaged object)")
            results[key] = array
        return results


def _first_line(err: BaseException) -> str:
    """The first line of an icechunk error (the rest is a Rust backtrace-like context)."""
    lines = [line.strip(" x|") for line in str(err).splitlines() if line.strip(" x|")]
    return lines[0] if lines else type(err).__name__


def read_manifest_bytes(repository: Location, session: Any) -> bytes:
    """The manifest.parquet bytes stored in ``session``'s snapshot, checked against the sha256 its array's
    attributes record (CorpusError when it holds none, or a damaged one)."""
    where = f"{repository}@{session.snapshot_id}/{MANIFEST_ARRAY}"
    meta, data = _get(session.store, [f"{MANIFEST_ARRAY}/zarr.json", f"{MANIFEST_ARRAY}/c/0"])
    for got in (meta, data):
        if got is None or isinstance(got, BaseException):
            raise CorpusError(f"{where}: missing: an icechunk repository without an octssl corpus"
                              f"{f' ({_first_line(got)})' if got else ''}")
    recorded = json.loads(meta).get("attributes", {}).get("sha256")
    if hashlib.sha256(data).hexdigest() != recorded:
        raise CorpusError(f"{where}/c/0: the manifest's sha256 differs from the one recorded at publish "
                          "(damaged object)")
    return bytes(data)


def pinned(value: str) -> str:
    """``value`` pinned to the snapshot it reads now: an icechunk repository's ``URL`` becomes
    ``URL@SNAPSHOT_ID`` (the tip of main), so every worker of a run reads the same snapshot; anything else
    (a snapshot already, or another kind of corpus) comes back as it is."""
    where, snapshot = split_snapshot(value)
    if snapshot is not None or not is_repository(where):
        return value
    return f"{value.rstrip('/')}@{_repository(where).lookup_branch(BRANCH)}"


def version_of(value: str | Path | Location) -> dict[str, str] | None:
    """``{"manifest_sha256", "snapshot_id"}`` of the icechunk corpus at ``value`` (``URL`` or
    ``URL@SNAPSHOT_ID``); None when ``value`` is not an icechunk repository."""
    where, snapshot = split_snapshot(value)
    if snapshot is None and not is_repository(where):
        return None
    corpus = IcechunkCorpus.at(where, snapshot)
    return {"manifest_sha256": corpus.manifest_sha256, "snapshot_id": corpus.snapshot_id}


# ---- publishing -----------------------------------------------------------------------------------
def publish(corpus_path: str | Path, url: str | Location, *, progress: bool = True) -> dict[str, Any]:
    """Commit the local corpus at ``corpus_path`` to the icechunk repository at ``url`` (created when the
    prefix or folder is empty): the arrays the published snapshot lacks and the manifest, in one commit.
    Returns counts and the new snapshot id. A repository holding another corpus is refused, and so is a
    non-empty prefix that is not an icechunk repository."""
    from octssl.corpus.journal import WriterLock

    where, snapshot = split_snapshot(url)
    if snapshot is not None:
        raise CorpusError(f"{url}: publish writes to a repository's branch main, not to a snapshot (drop @{snapshot})")
    corpus = Corpus.open(corpus_path)
    with WriterLock(corpus.folder):
        corpus = Corpus.open(corpus_path)  # the committed state under the lock
        manifest = Path(corpus.folder / mf.MANIFEST_NAME).read_bytes()
        sha = hashlib.sha256(manifest).hexdigest()
        if is_repository(where):
            published = IcechunkCorpus.at(where)
            if published.manifest_sha256 == sha:
                return {"samples": len(corpus), "arrays": 0, "snapshot_id": published.snapshot_id, "already": True}
            repo, todo = _repository(where), _missing_arrays(published, corpus)
        else:
            if where.files():
                raise CorpusError(f"{where}: not empty and not an icechunk repository; publish to an empty prefix")
            repo, todo = _repository(where, create=True), [(row, key) for row in corpus.rows
                                                            for key in sorted(present(row))]
        session = repo.writable_session(BRANCH)
        _write_arrays(session, corpus, todo, progress)
        _write_manifest(session, manifest, sha)
        _verify_written(IcechunkCorpus(where, session, manifest), todo, progress)
        message = f"octssl {__version__} publish: {len(corpus)} samples, manifest sha256 {sha}"
        ic = _icechunk()
        try:
            snapshot = session.commit(message, metadata={"octssl_version": __version__, "manifest_sha256": sha,
                                                         "samples": len(corpus)})
        except ic.ConflictError as err:
            raise CorpusError(f"{where}: another publish committed first; nothing of this one was committed, "
                              f"publish again ({err})") from None
    return {"samples": len(corpus), "arrays": len(todo), "snapshot_id": str(snapshot), "already": False}


def _missing_arrays(published: IcechunkCorpus, corpus: Corpus) -> list[tuple[dict[str, Any], str]]:
    """(row, key) of every array of ``corpus`` that ``published`` lacks; CorpusError when ``published`` holds a
    row ``corpus`` does not, or an array stored at another slot or with another checksum (another corpus)."""
    before = {row["id"]: row for row in published.rows}
    gone = [sid for sid in before if sid not in corpus]
    if gone:
        raise CorpusError(f"{published.repository}: holds another corpus (sample {gone[0]} is not in "
                          f"{corpus.path}); publish to a new URL")
    todo = []
    for row in corpus.rows:
        old = before.get(row["id"])
        for key in sorted(present(row)):
            if old is None or key not in present(old):
                todo.append((row, key))
            elif slot(key, old) != slot(key, row) or old["sha256"][key] != row["sha256"][key]:
                raise CorpusError(f"{published.repository}: holds another corpus (sample {row['id']}: '{key}' "
                                  f"differs from {corpus.path}); publish to a new URL")
    return todo


def _write_arrays(session: Any, corpus: Corpus, todo: list[tuple[dict[str, Any], str]], progress: bool) -> None:
    """Create or grow every array to the local one's shape (one chunk per slot; the local writer grows all
    the arrays of a grid together, also those a new row lacks), then write ``todo``'s arrays."""
    from octssl.corpus.writer import ZSTD_LEVEL

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


def _verify_written(written: IcechunkCorpus, todo: Iterable[tuple[dict[str, Any], str]], progress: bool) -> None:
    """Read every array just written back from the object store (before the commit) and check its sha256."""
    todo = list(todo)
    with stage("verify upload", len(todo), progress) as advance:
        for row, key in todo:
            try:
                written.read_array(key, row)
            except CorpusError as err:
                raise CorpusError(f"upload check failed, nothing was committed; publish again: {err}") from err
            advance()
