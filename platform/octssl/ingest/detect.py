"""Find ingest units under the given paths and tell their format from their content (magic bytes).

A unit is one device file, or one B-scan stack folder (PNG/BMP/TIFF images + one JSON sidecar).
Formats: Heidelberg ``.vol`` ("HSF-OCT-" at 0), Heidelberg ``.e2e`` ("CMDb" at 0), Topcon ``.fds`` /
``.fda`` ("FOCT" at 0, then "FDS" / "FDA" / "FAA"), DICOM ("DICM" at 128; the reader then checks the SOP
class is ophthalmic tomography), eyepy ``.eye`` (a zip holding ``raw_volume.npy``) and HEYEX XML exports
(an XML file with a ``<HEDX>`` root beside its TIFF images). Extensions are only a hint for walking folders: a file named ``.vol``
without the Heidelberg header is rejected as "not a recognised format", and a DICOM file without an
extension is found by its preamble.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from octssl.errors import IngestError

VOL, E2E, FDS, FDA, DICOM, STACK = "heidelberg-vol", "heidelberg-e2e", "topcon-fds", "topcon-fda", "dicom", "stack"
EYE, HEYEX_XML = "eyepy-eye", "heyex-xml"
FORMATS = (VOL, E2E, FDS, FDA, DICOM, STACK, EYE, HEYEX_XML)
DEVICE_SUFFIXES = {".vol", ".e2e", ".sdb", ".fds", ".fda", ".dcm", ".dicom", ".eye"}
ZIP_MAGIC = b"PK\x03\x04"  # an eyepy .eye file is a zip holding raw_volume.npy and meta.json
IMAGE_SUFFIXES = {".png", ".bmp", ".tif", ".tiff"}
_HEAD = 132


def sniff(head: bytes) -> str | None:
    """The format named by a file's first bytes, or None."""
    if head.startswith(b"HSF-OCT-"):
        return VOL
    if head.startswith(b"CMDb"):
        return E2E
    if head.startswith(b"FOCT"):
        kind = head[4:7]
        return FDS if kind == b"FDS" else FDA if kind in (b"FDA", b"FAA") else None
    if len(head) >= 132 and head[128:132] == b"DICM":
        return DICOM
    if head.startswith(ZIP_MAGIC):
        return EYE  # confirmed by detect_format (the zip must hold raw_volume.npy)
    if b"<HEDX" in head:
        return HEYEX_XML
    return None


def detect_format(path: Path) -> str:
    """Format of the unit at ``path``; IngestError with a specific reason when there is none."""
    if path.is_dir():
        stack_sidecar(path)  # raises with the reason when the folder is not a valid stack
        return STACK
    with open_regular(path) as (handle, size):
        head = handle.read(min(_HEAD, size))
    if size == 0:
        raise IngestError(f"{path}: empty file (0 bytes)")
    found = sniff(head)
    if found is None:
        hint = f" although named {path.suffix}" if path.suffix.lower() in DEVICE_SUFFIXES else ""
        raise IngestError(
            f"{path}: not a recognised format{hint} (first bytes {head[:8]!r}; expected a Heidelberg "
            "'HSF-OCT-'/'CMDb', Topcon 'FOCT' or DICOM 'DICM' header, a HEYEX XML export or an eyepy .eye file)"
        )
    if found == EYE:

        try:
            with zipfile.ZipFile(path) as archive:
                names = set(archive.namelist())
        except (zipfile.BadZipFile, OSError) as err:
            raise IngestError(f"{path}: a zip file but not a readable eyepy .eye file ({err})") from err
        if "raw_volume.npy" not in names:
            raise IngestError(f"{path}: a zip file without raw_volume.npy: not an eyepy .eye file")
    return found


@contextmanager
def open_regular(path: Path) -> Iterator[tuple[BinaryIO, int]]:
    """``(handle, size)`` of ``path`` opened for reading, when it is a regular file (after symlinks);
    IngestError naming what it is otherwise. Opening never blocks (a FIFO is refused, not waited on) and
    callers read at most ``size`` bytes (a device file such as /dev/zero never ends)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise IngestError(f"{path}: {_os_reason(err, path)}") from None
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise IngestError(f"{path}: not a regular file ({_kind(mode)}); only regular files are read")
        yield handle, os.fstat(fd).st_size


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))
    return next((name for test, name in kinds if test(mode)), "not a plain file")


def _os_reason(err: OSError, path: Path) -> str:
    if err.errno == errno.ELOOP:
        return "symlink loop (the link points back at itself)"
    if err.errno == errno.ENOENT and path.is_symlink():
        return f"broken symlink (to {os.readlink(path)})"
    return f"cannot read ({err.strerror})"


def stack_sidecar(folder: Path) -> Path:
    """The one JSON sidecar of a B-scan stack folder (IngestError naming what is wrong)."""
    sidecars = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".json" and not p.name.startswith("."))
    images = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise IngestError(f"{folder}: a stack folder needs PNG/BMP/TIFF B-scans; none found")
    if len(sidecars) != 1:
        raise IngestError(f"{folder}: a stack folder needs exactly one JSON sidecar, found {len(sidecars)}")
    return sidecars[0]


def _is_stack(folder: Path, names: list[str]) -> bool:
    suffixes = {Path(n).suffix.lower() for n in names}
    return ".json" in suffixes and bool(suffixes & IMAGE_SUFFIXES)


def discover(sources: list[Path]) -> list[Path]:
    """Ingest units under ``sources``, sorted and unique (what :func:`find_units` rejects is dropped)."""
    return find_units(sources)[0]


def find_units(sources: list[Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Ingest units under ``sources`` (sorted, unique) and ``(path, reason)`` for what cannot be one.

    Paths named directly are always units. Walking a folder, a sub-folder with a JSON sidecar and images
    is one stack unit; other files are units when their extension is a device one or their magic bytes
    are recognised (so README/LICENSE files beside the data are not reported as rejects). Rejected with a
    reason: symlink loops and broken links, FIFOs and device files named like scans, unreadable folders.
    """
    units: set[Path] = set()
    rejects: list[tuple[str, str]] = []

    def unreadable(err: OSError) -> None:
        rejects.append((str(err.filename), f"cannot read folder ({err.strerror})"))

    for source in sources:
        source = Path(source)
        if not source.exists() and not source.is_symlink():
            raise IngestError(f"{source}: no such file or folder")
        if source.is_dir():
            for root, dirs, files in os.walk(source, onerror=unreadable):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                folder = Path(root)
                if _is_stack(folder, files):
                    units.add(folder.resolve())
                    dirs[:] = []
                    continue
                for name in files:
                    if not name.startswith("."):
                        _classify(folder / name, named=False, units=units, rejects=rejects)
        else:
            _classify(source, named=True, units=units, rejects=rejects)
    return sorted(units), sorted(rejects)


def _classify(path: Path, named: bool, units: set[Path], rejects: list[tuple[str, str]]) -> None:
    """Add ``path`` to ``units`` or ``rejects``, or leave it (a file beside the data, not named directly)."""
    try:
        mode = path.stat().st_mode
    except OSError as err:
        rejects.append((str(path), _os_reason(err, path)))
        return
    device = named or path.suffix.lower() in DEVICE_SUFFIXES
    if not stat.S_ISREG(mode):
        if device:
            rejects.append((str(path), f"not a regular file ({_kind(mode)}); only regular files are read"))
        return
    if device or _sniff_file(path) is not None:
        units.add(path.resolve())


def _sniff_file(path: Path) -> str | None:
    try:
        with open_regular(path) as (handle, size):
            return sniff(handle.read(min(_HEAD, size)))
    except IngestError:
        return None


def content_hash(path: Path) -> str:
    """sha256 of a file's bytes, or of a stack folder's (name, bytes) pairs in name order; IngestError when
    a file (or any entry of the folder) is not a regular file. Reads at most each file's size."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if not p.is_dir()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.name.encode("utf-8") + b"\0")
        with open_regular(file) as (handle, size):
            left = size
            while left and (block := handle.read(min(left, 1 << 20))):
                digest.update(block)
                left -= len(block)
    return digest.hexdigest()
