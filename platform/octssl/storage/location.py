"""Where data lives: a local path or an object-store URL (``s3://``, ``gs://``), one file API for both.

``Location.parse(value)`` is how every command takes a path: a URL is never mistaken for a local path
(``s3://b/x`` does not become a folder ``s3:``), a scheme octssl cannot serve is refused with a
StorageError, and a plain path stays a local path. Object stores are reached through ``pyarrow.fs``:
it is already a dependency, Ray Train takes the same filesystem for ``storage_path``, its files read
byte ranges (``read_at``), and its S3 client has bounded timeouts and retries with exponential backoff
on throttling, 5xx and timeouts (the AWS SDK's standard retry strategy).

S3 settings come from the standard variables only: ``AWS_ENDPOINT_URL`` (e.g. ``http://127.0.0.1:8333``
for a local SeaweedFS/MinIO; unset means AWS), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION``. Without keys the AWS SDK's default chain applies (e.g. a pod's web identity). Nothing
here logs or prints a credential; a Location's text is its URL, which never holds one.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs
from fsspec.implementations.arrow import ArrowFSWrapper
from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

from octssl.errors import StorageError
from octssl.storage.files import atomic_file

#: Schemes served; ``file://`` is a local path.
SCHEMES = ("s3", "gs")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
CONNECT_TIMEOUT_S = 5.0  # a server that is gone fails a request in seconds, never hangs it
REQUEST_TIMEOUT_S = 60.0
MAX_ATTEMPTS = 5  # per request, with exponential backoff (AWS standard strategy)


def is_url(value: str | Path | Location) -> bool:
    """Whether ``value`` is written as a URL (``scheme://...``), served or not."""
    if isinstance(value, Location):
        return value.remote
    return bool(_URL.match(str(value)))


class Location:
    """A local path or a ``scheme://bucket/key`` URL; ``/`` joins names; ``str()`` gives it back."""

    __slots__ = ("scheme", "path")

    def __init__(self, scheme: str, path: str) -> None:
        self.scheme, self.path = scheme, path  # scheme "" = local; path = the filesystem's path

    @classmethod
    def parse(cls, value: str | Path | Location) -> Location:
        """``value`` as a Location; StorageError for a scheme octssl cannot serve or a URL without a bucket."""
        if isinstance(value, Location):
            return value
        text = os.fspath(value)
        match = _URL.match(text)
        if match is None:
            return cls("", str(Path(text).expanduser()))
        scheme, rest = match.group(1).lower(), match.group(2)
        if scheme == "file":
            return cls("", str(Path(rest or "/")))
        if scheme not in SCHEMES:
            raise StorageError(f"{text}: unsupported URL scheme {scheme!r}; octssl reads and writes local paths "
                               f"and {', '.join(s + '://' for s in SCHEMES)} URLs")
        if rest.startswith("/"):
            rest = ""
        rest = rest.strip("/")
        if not rest or rest.startswith("."):
            raise StorageError(f"{text}: a {scheme}:// URL needs a bucket name ({scheme}://BUCKET/PREFIX)")
        return cls(scheme, re.sub("/+", "/", rest))

    # ---- names ---------------------------------------------------------------------------------
    @property
    def remote(self) -> bool:
        return bool(self.scheme)

    @property
    def local(self) -> Path:
        """The local path (StorageError for a URL: callers that need a disk path check ``remote`` first)."""
        if self.remote:
            raise StorageError(f"{self}: needs a local path here, not a URL")
        return Path(self.path)

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0] if self.remote else ""

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        if not self.remote:
            return Location("", str(Path(self.path).parent))
        head = self.path.rsplit("/", 1)[0] if "/" in self.path else self.path
        return Location(self.scheme, head)

    def __truediv__(self, name: str) -> Location:
        if not self.remote:
            return Location("", str(Path(self.path) / name))
        return Location(self.scheme, f"{self.path.rstrip('/')}/{name.strip('/')}")

    def __str__(self) -> str:
        return f"{self.scheme}://{self.path}" if self.remote else self.path

    def __fspath__(self) -> str:
        if self.remote:
            raise StorageError(f"{self}: a URL is not a local path")
        return self.path

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and (self.scheme, self.path) == (other.scheme, other.path)

    def __hash__(self) -> int:
        return hash((self.scheme, self.path))

    # ---- the filesystem ------------------------------------------------------------------------
    @property
    def fs(self) -> pafs.FileSystem:
        return filesystem(self.scheme)

    def info(self) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.path)
        except OSError as err:
            raise storage_error(self, err) from err

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        """A folder, or a prefix that holds at least one object."""
        return self.info().type == pafs.FileType.Directory

    def size(self) -> int:
        info = self.info()
        if info.type != pafs.FileType.File:
            raise StorageError(f"{self}: no such file")
        return int(info.size)

    def read_bytes(self) -> bytes:
        if not self.remote:
            return Path(self.path).read_bytes()
        try:
            with self.fs.open_input_stream(self.path) as handle:
                return handle.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self}: not found") from None
        except OSError as err:
            raise storage_error(self, err) from err

    def open_input(self) -> pafs.NativeFile | IO[bytes]:
        """A random-access reader (``read_at``/``seek``/``readinto``); on S3 each read is one range request."""
        if not self.remote:
            return open(self.path, "rb", buffering=0)
        try:
            return self.fs.open_input_file(self.path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self}: not found") from None
        except OSError as err:
            raise storage_error(self, err) from err

    @contextmanager
    def open_output(self) -> Iterator[IO[bytes]]:
        """Write ``self`` whole or not at all: locally via a renamed temp file, remotely as one upload
        (an object appears only when its upload completes)."""
        if not self.remote:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(self.path) as handle:
                yield handle
            return
        try:
            with self.fs.open_output_stream(self.path) as handle:
                yield handle
        except OSError as err:
            raise storage_error(self, err) from err

    def write_bytes(self, data: bytes) -> None:
        with self.open_output() as handle:
            handle.write(data)

    def files(self) -> list[Location]:
        """Every file under this folder/prefix (recursive, sorted); empty when there is none."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        except OSError as err:
            raise storage_error(self, err) from err
        return sorted((Location(self.scheme, i.path) for i in infos if i.type == pafs.FileType.File),
                      key=lambda loc: loc.path)

    def delete(self) -> None:
        """Remove this file (absent is fine)."""
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise storage_error(self, err) from err

    def upload(self, source: str | Path) -> None:
        """Copy the local file ``source`` to this location (one upload; multipart for big files)."""
        try:
            pafs.copy_files(str(source), self.path, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
        except OSError as err:
            raise storage_error(self, err) from err

    def download(self, target: str | Path) -> Path:
        """Copy this file to the local ``target`` (atomically); returns it."""
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        with self.open_input() as source, atomic_file(target) as handle:
            while block := source.read(1 << 24):
                handle.write(block)
        return target


@contextmanager
def local_copy(path: str | Path | Location) -> Iterator[Path]:
    """A local path holding the file ``path``: itself, or a temporary download of the object."""
    where = Location.parse(path)
    if not where.remote:
        yield where.local
        return
    with tempfile.TemporaryDirectory(prefix="octssl-get-") as folder:
        yield where.download(Path(folder) / where.name)


def download_files(where: str | Path | Location, target: str | Path, names: list[str]) -> list[str]:
    """Copy the files ``names`` (relative to ``where``) to the same names under the local ``target``; those
    that do not exist are skipped. Returns the names copied."""
    where = Location.parse(where)
    copied = []
    for name in names:
        try:
            (where / name).download(Path(target) / name)
        except FileNotFoundError:
            continue
        copied.append(name)
    return copied


def absolute(value: str | Path) -> str:
    """``value`` as an absolute local path, or the URL it is (a URL is never resolved against the cwd)."""
    where = Location.parse(value)
    return str(where) if where.remote else str(where.local.resolve())


def upload_tree(source: str | Path, target: str | Path | Location, last: tuple[str, ...] = ()) -> None:
    """Copy every file under the local folder ``source`` to the same names under ``target``; the files that
    match the glob patterns ``last`` (relative to ``source``) go after all the others, pattern by pattern
    (so that an object whose presence means "complete" appears only once the rest is there)."""
    target = Location.parse(target)
    if not target.remote:
        raise StorageError(f"{target}: upload_tree needs an object-store URL")
    if last:
        folder = Path(source)
        late = [p for pattern in last for p in sorted(folder.glob(pattern)) if p.is_file()]
        early = [p for p in sorted(folder.rglob("*")) if p.is_file() and p not in late]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda p: (target / p.relative_to(folder).as_posix()).upload(p), early))
        for path in late:
            (target / path.relative_to(folder).as_posix()).upload(path)
        return
    try:
        pafs.copy_files(str(source), target.path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=target.fs, use_threads=True)
    except OSError as err:
        raise storage_error(target, err) from err


def staging_dir(where: Location) -> Path:
    """The local folder that stands for the remote folder ``where`` while a job writes into it
    (``OCTSSL_STAGING``, default ``$TMPDIR/octssl-staging``, then scheme/bucket/prefix)."""
    root = Path(os.environ.get("OCTSSL_STAGING") or Path(tempfile.gettempdir(), "octssl-staging"))
    return root / where.scheme / where.path


def storage_error(where: Location, err: BaseException) -> StorageError:
    """A StorageError naming the URL (and the bucket for access errors); credentials never appear."""
    text = str(err)
    if "ACCESS_DENIED" in text or "AccessDenied" in text or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        return StorageError(f"{where}: access denied to bucket {where.bucket!r}: check AWS_ACCESS_KEY_ID / "
                            f"AWS_SECRET_ACCESS_KEY and the bucket's policy ({text})")
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        return StorageError(f"{where}: bucket {where.bucket!r} does not exist")
    return StorageError(f"{where}: {text}")


def filesystem(scheme: str) -> pafs.FileSystem:
    """The pyarrow filesystem of ``scheme`` ("" local), built from the environment of this process."""
    if not scheme:
        return pafs.LocalFileSystem()
    if scheme == "s3":
        keys = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_SESSION_TOKEN")
        return _s3(os.getpid(), *(os.environ.get(key) for key in keys))  # per process: the client is not fork-safe
    if scheme == "gs":
        return pafs.GcsFileSystem()
    raise StorageError(f"unsupported URL scheme {scheme!r}")


@functools.lru_cache(maxsize=8)
def _s3(pid: int, endpoint: str | None, key: str | None, secret: str | None, region: str | None,
        token: str | None) -> pafs.S3FileSystem:
    options: dict[str, Any] = {
        "connect_timeout": CONNECT_TIMEOUT_S, "request_timeout": REQUEST_TIMEOUT_S,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
        "region": region or "us-east-1",
    }
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise StorageError(f"AWS_ENDPOINT_URL={endpoint!r}: expected http(s)://HOST[:PORT]")
        options.update(endpoint_override=parts.netloc, scheme=parts.scheme, force_virtual_addressing=False)
    if key and secret:
        options.update(access_key=key, secret_key=secret, session_token=token)
    elif key or secret:
        raise StorageError("set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or neither")
    return pafs.S3FileSystem(**options)


def fsspec_async(where: Location) -> Any:
    """An asynchronous fsspec view of ``where``'s filesystem (what ``zarr.storage.FsspecStore`` needs)."""

    class ArrowFS(ArrowFSWrapper):
        fsid = f"octssl-{where.scheme or 'local'}"  # fsspec's own fsid assumes HDFS (host, port)

        def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
            # fsspec opens a range from byte 0 as a stream, which it then cannot seek: the first chunk of a
            # shard (Zarr's partial shard reads, sub-volume chunks) would fail to read.
            kwargs.setdefault("seekable", start is not None or end is not None)
            return super().cat_file(path, start, end, **kwargs)

    return AsyncFileSystemWrapper(ArrowFS(where.fs), asynchronous=True)


def ray_storage(path: str | Path) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for ``ray.train.RunConfig``: a local path as is, or an
    object-store prefix with the filesystem octssl built from the standard variables."""
    where = Location.parse(path)
    return (where.path, where.fs) if where.remote else (where.path, None)
