"""icechunk corpora, the read side: a repository at a snapshot as a corpus backend, and naming snapshots.

An icechunk repository (``s3://BUCKET/PREFIX`` or a local folder) holds the corpus's arrays under the same
paths as its ``volumes.zarr`` (``oct/<grid>``, ``faf/<grid>``, ..., ``localizer/<H>x<W>``) with one object
per volume (chunk = one slot, no sharding codec, zstd with a content checksum, as the corpus uses), and the
corpus's ``manifest.parquet`` bytes, unchanged, as the 1-D uint8 array ``manifest.parquet`` (one
uncompressed chunk). ``octssl.corpus.icechunk`` writes them (``octssl publish --icechunk``).

``Corpus.open("URL")`` reads the tip of ``main``; ``Corpus.open("URL@SNAPSHOT_ID")`` reads that snapshot
(the 20-character id a publish prints and a run's summary records). Every array is read by one ``get`` of
its chunk key and a zstd decode, and checked against the manifest's sha256. The ``icechunk`` library is
imported only when a repository is used (a heavy optional dependency).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import zarr
from numcodecs.zstd import Zstd
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync as zarr_sync

from octssl.corpus import manifest as mf
from octssl.corpus.backends import ZarrBackend
from octssl.corpus.layout import array_path, slot
from octssl.errors import CorpusError, StorageError
from octssl.storage.location import Location, storage_error

BRANCH = "main"
MANIFEST_ARRAY = mf.MANIFEST_NAME  # the manifest's bytes, as a 1-D uint8 array at the repository's root
_SNAPSHOT = re.compile(r"^(.+)@([0-9A-HJKMNP-TV-Z]{20})$")  # icechunk ids: 20 Crockford base32 characters


def split_snapshot(value: str | Path | Location) -> tuple[Location, str | None]:
    """``URL@SNAPSHOT_ID`` -> (the repository's Location, the id); anything else -> (its Location, None)."""
    match = _SNAPSHOT.match(str(value))
    if match is None:
        return Location.parse(value), None
    return Location.parse(match.group(1)), match.group(2)


def is_repository(where: Location) -> bool:
    """Whether ``where`` holds an icechunk repository (its branch ``main`` exists)."""
    return (where / "refs" / f"branch.{BRANCH}" / "ref.json").is_file()


def icechunk_library() -> Any:
    import icechunk

    icechunk.set_logs_filter("error")  # its one warning: local storage is unsafe for concurrent commits
    return icechunk


def storage_of(where: Location) -> Any:
    """icechunk's Storage for a local folder or an ``s3://`` URL, from the standard AWS_* variables only."""
    ic = icechunk_library()
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


def open_repository(where: Location, create: bool = False) -> Any:
    ic = icechunk_library()
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


class IcechunkBackend(ZarrBackend):
    """A corpus read from an icechunk repository at one snapshot (read-only); ``path`` is ``URL@SNAPSHOT_ID``."""

    def __init__(self, repository: Location, session: Any, manifest: bytes) -> None:
        self.repository, self.session, self.snapshot_id = repository, session, str(session.snapshot_id)
        self.manifest_bytes = manifest
        self.manifest_sha256 = hashlib.sha256(manifest).hexdigest()
        pinned = Location.parse(f"{repository}@{self.snapshot_id}")
        super().__init__(pinned)
        self.read_only = True  # append says to append locally and publish again
        self.manifest_path = pinned / MANIFEST_ARRAY
        self.zarr_path = pinned  # the arrays sit at the repository's root
        self._zstd = Zstd()

    @classmethod
    def at(cls, repository: Location, snapshot: str | None = None) -> IcechunkBackend:
        """The backend at ``snapshot`` (default: the tip of branch main); CorpusError when there is none."""
        if not is_repository(repository):  # also where wrong keys are reported, naming the bucket
            raise CorpusError(f"{repository}: no icechunk repository here (no branch '{BRANCH}')")
        ic = icechunk_library()
        repo = open_repository(repository)
        try:
            session = (repo.readonly_session(snapshot_id=snapshot) if snapshot
                       else repo.readonly_session(branch=BRANCH))
        except ic.IcechunkError as err:
            raise CorpusError(f"{repository}@{snapshot or BRANCH}: no such snapshot in this icechunk repository "
                              f"({_first_line(err)})") from None
        return cls(repository, session, read_manifest_bytes(repository, session))

    def manifest(self) -> pa.Table:
        """The snapshot's manifest, checked."""
        return mf.parse_manifest(self.manifest_bytes, str(self.manifest_path))

    def version(self) -> str:
        return self.manifest_sha256

    def storage_root(self) -> Location:
        return self.repository

    def zarr_store(self) -> Any:
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

    def read_arrays(self, keys: list[str], row: dict[str, Any]) -> dict[str, np.ndarray]:
        """One ``get`` per array (all of a row's at once), zstd-decoded and checked against the manifest's sha256;
        CorpusError naming the chunk (the object) and the sample on any failure."""
        chunks, shapes = [], []
        for key in keys:
            grid, index = slot(key, row)
            _, arr = self.stored(key, grid, index, row)
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
    return f"{value.rstrip('/')}@{open_repository(where).lookup_branch(BRANCH)}"


def version_of(value: str | Path | Location) -> dict[str, str] | None:
    """``{"manifest_sha256", "snapshot_id"}`` of the icechunk corpus at ``value`` (``URL`` or
    ``URL@SNAPSHOT_ID``); None when ``value`` is not an icechunk repository."""
    where, snapshot = split_snapshot(value)
    if snapshot is None and not is_repository(where):
        return None
    backend = IcechunkBackend.at(where, snapshot)
    return {"manifest_sha256": backend.manifest_sha256, "snapshot_id": str(backend.snapshot_id)}


