"""The committed manifest of a local corpus: ``manifest.parquet`` (the base) plus ``manifest.parts/`` (one small
Parquet file per append), so that an append writes its own rows, not the whole manifest again.

Parts are named by the range of append numbers they hold, ``<first>-<last>.parquet`` (12 digits each); the
part of one append has ``first == last``. Writing a part (write-then-rename) is the commit point of an
append, and the part's metadata carries the append's token (what the undo journal compares). The base's
settings record ``parts_through``: parts up to that number are folded into the base and ignored.

Upkeep after each append, under the writer lock, keeps reads and writes cheap without a second kind of
commit: the newest two parts are merged while the newer is at least as long as the one before (a binary
counter: O(log) parts, each row rewritten O(log) times), and all parts are folded into a new base once they
hold as many rows as the base (the base doubles, so its rewrites cost O(1) per row overall), and on the
first append to a corpus of an older format (its base is written once in the current format). A merged file
is written before the files it replaces are deleted, and a reader ignores a part that a wider part (or the
base's ``parts_through``) covers, so a crash at any point of the upkeep leaves the same committed rows.

A corpus without ``manifest.parts/`` (every corpus written before format 3, and every published one) is
its base alone.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from octssl.corpus import manifest as mf
from octssl.errors import CorpusError
from octssl.storage.files import atomic_file, fsync_dir

PARTS_DIR = "manifest.parts"
_PART = re.compile(r"^(\d{12})-(\d{12})\.parquet$")
_TOKEN_KEY = b"octssl_part"


@dataclass
class Part:
    """One live part file: the appends ``first..last`` it holds and their rows."""

    path: Path
    first: int
    last: int
    table: pa.Table
    token: str
    stamp: tuple[int, int, int] = (0, 0, 0)  # the file's (inode, mtime, size) when read or written


@dataclass
class Committed:
    """What a local corpus holds now: the base, the live parts in order, and the settings."""

    folder: Path
    base: pa.Table
    parts: list[Part] = field(default_factory=list)
    stamp: tuple[int, int, int] = (0, 0, 0)  # manifest.parquet's (inode, mtime, size) when read or written

    def same_rows(self, other: Committed | None) -> bool:
        """Whether ``other`` holds these very tables (a writer re-reading an unchanged corpus reuses them)."""
        return (other is not None and other.base is self.base and len(other.parts) == len(self.parts)
                and all(a.table is b.table for a, b in zip(self.parts, other.parts, strict=True)))

    @property
    def table(self) -> pa.Table:
        """Every committed row, base first then the parts in append order, with the base's settings."""
        if not self.parts:
            return self.base
        table = pa.concat_tables([self.base, *(p.table for p in self.parts)])  # zero-copy: chunks side by side
        settings = {**mf.settings_of(self.base), "format": mf.FORMAT_VERSION}
        return table.replace_schema_metadata({b"octssl": json.dumps(settings).encode()})

    @property
    def token(self) -> str | None:
        """The token of the last committed append (what the undo journal of an interrupted one compares)."""
        return self.parts[-1].token if self.parts else mf.settings_of(self.base)["append_token"]

    @property
    def last(self) -> int:
        """The number of the last committed append (0 for none since the format with parts)."""
        return self.parts[-1].last if self.parts else int(mf.settings_of(self.base).get("parts_through", 0))


def _stamp(path: Path) -> tuple[int, int, int]:
    try:
        info = path.stat()
    except FileNotFoundError:
        return (0, 0, 0)
    return (info.st_ino, info.st_mtime_ns, info.st_size)


def read(folder: Path, known: Committed | None = None) -> Committed:
    """The committed manifest of the corpus at ``folder`` (CorpusError naming the file when one is bad).
    Files unchanged since ``known`` was read (same inode, mtime and size) are not read again: a writer that
    appends again pays for the parts other writers added, not for the whole manifest."""
    stamp = _stamp(folder / mf.MANIFEST_NAME)
    if known is not None and known.stamp == stamp and stamp != (0, 0, 0):
        base = known.base
    else:
        base = mf.read_manifest(folder / mf.MANIFEST_NAME)
    through = int(mf.settings_of(base).get("parts_through", 0))
    live = _live(folder, through)
    parts = []
    expected = through + 1
    for first, last, path in live:
        if first != expected:
            raise CorpusError(f"{folder / PARTS_DIR}: appends {expected}..{first - 1} are missing (a part file was "
                              "deleted); restore the corpus from a backup")
        cached = {p.path: p for p in known.parts} if known is not None else {}
        old = cached.get(path)
        parts.append(old if old is not None and old.stamp == _stamp(path) and old.first == first and old.last == last
                     else _read_part(path, first, last, base.schema))
        expected = last + 1
    return Committed(folder, base, parts, stamp)


def _live(folder: Path, through: int) -> list[tuple[int, int, Path]]:
    """(first, last, path) of the part files not folded into the base nor covered by a wider part, in order."""
    directory = folder / PARTS_DIR
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _PART.match(path.name)
        if match and int(match.group(2)) > through:
            found.append((int(match.group(1)), int(match.group(2)), path))
    found.sort(key=lambda p: (p[0], -p[1]))  # at equal starts the widest first
    live: list[tuple[int, int, Path]] = []
    for first, last, path in found:
        if live and last <= live[-1][1]:
            continue  # covered by a merged part written before its inputs were deleted
        live.append((first, last, path))
    return live


def _read_part(path: Path, first: int, last: int, schema: pa.Schema) -> Part:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise CorpusError(f"{path}: cannot read manifest part as Parquet: {err}") from err
    token = (table.schema.metadata or {}).get(_TOKEN_KEY)
    checked = mf.checked_manifest(table, path)
    return Part(path, first, last, checked.cast(schema), json.loads(token)["token"] if token else "", _stamp(path))


def commit(committed: Committed, rows: pa.Table, token: str) -> Committed:
    """Commit one append's ``rows``: write them as the next part (the commit point). Returns the new state."""
    number = committed.last + 1
    part = _write_part(committed.folder, number, number, rows, token, committed.base.schema)
    return Committed(committed.folder, committed.base, [*committed.parts, part], committed.stamp)


def _write_part(folder: Path, first: int, last: int, rows: pa.Table, token: str, schema: pa.Schema) -> Part:
    directory = folder / PARTS_DIR
    if not directory.is_dir():
        directory.mkdir()
        fsync_dir(folder)
    path = directory / f"{first:012d}-{last:012d}.parquet"
    table = rows.cast(schema).replace_schema_metadata({_TOKEN_KEY: json.dumps({"token": token}).encode()})
    with atomic_file(path) as handle:
        pq.write_table(table, handle)
    return Part(path, first, last, rows.cast(schema), token, _stamp(path))


def rewrite(committed: Committed, table: pa.Table, settings: dict) -> Committed:
    """Replace every committed row by ``table`` in a new base (an attach, which changes rows in place, and the
    upkeep's fold): the base names the parts it absorbs, then their files are deleted."""
    settings = {**settings, "parts_through": committed.last, "format": mf.FORMAT_VERSION}
    base = mf.with_settings(table, settings)
    mf.write_manifest(base, committed.folder / mf.MANIFEST_NAME)
    _delete(committed.folder, [p.path for p in committed.parts] + _stale(committed))
    return Committed(committed.folder, base, [], _stamp(committed.folder / mf.MANIFEST_NAME))


def upkeep(committed: Committed) -> Committed:
    """Merge and fold parts after an append (see the module doc); returns the new state."""
    parts = list(committed.parts)
    while len(parts) >= 2 and parts[-1].table.num_rows >= parts[-2].table.num_rows:
        older, newer = parts[-2], parts[-1]
        merged = _write_part(committed.folder, older.first, newer.last,
                             pa.concat_tables([older.table, newer.table]), newer.token, committed.base.schema)
        _delete(committed.folder, [older.path, newer.path])
        parts[-2:] = [merged]
    committed = Committed(committed.folder, committed.base, parts, committed.stamp)
    _delete(committed.folder, _stale(committed))
    outdated = int(mf.settings_of(committed.base)["format"]) < mf.FORMAT_VERSION  # upgraded on its first append
    if parts and (outdated or sum(p.table.num_rows for p in parts) >= committed.base.num_rows):
        settings = {**mf.settings_of(committed.base), "append_token": committed.token}
        committed = rewrite(committed, committed.table, settings)
    return committed


def _stale(committed: Committed) -> list[Path]:
    """Files in the parts folder that no reader uses: parts covered by a wider part or folded into the base
    (left by a crash in the upkeep) and temporary files of an interrupted write."""
    directory = committed.folder / PARTS_DIR
    if not directory.is_dir():
        return []
    live = {p.path for p in committed.parts}
    return [p for p in directory.iterdir() if p not in live and (_PART.match(p.name) or p.name.endswith(".tmp"))]


def fold(folder: Path) -> None:
    """Fold every live part of the corpus at ``folder`` into its base (under the writer lock): a publish
    uploads the one manifest.parquet. A no-op without parts."""
    committed = read(folder)
    if committed.parts:
        rewrite(committed, committed.table, {**mf.settings_of(committed.base), "append_token": committed.token})


def _delete(folder: Path, paths: list[Path]) -> None:
    for path in paths:  # a covered part is ignored by readers, so the order of deletion does not matter
        path.unlink(missing_ok=True)
    if paths:
        fsync_dir(folder / PARTS_DIR)


def version(folder: Path) -> str:
    """The version of the corpus at ``folder``: the sha256 of its manifest.parquet when it has no live parts
    (so a corpus written before parts keeps its version), else the sha256 of the base's and each live part's
    sha256 in order. Equal versions mean equal rows, and every row holds its arrays' sha256."""
    base_sha = _sha256(folder / mf.MANIFEST_NAME)
    try:
        through = int(json.loads((pq.read_schema(folder / mf.MANIFEST_NAME).metadata or {}).get(b"octssl", b"{}"))
                      .get("parts_through", 0))
    except (pa.ArrowException, OSError, ValueError, AttributeError) as err:
        raise CorpusError(f"{folder / mf.MANIFEST_NAME}: cannot read manifest as Parquet: {err}") from err
    live = _live(folder, through)
    if not live:
        return base_sha
    return hashlib.sha256("\n".join([base_sha, *(_sha256(path) for _, _, path in live)]).encode()).hexdigest()


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        raise CorpusError(f"{path}: manifest is missing (not an octssl corpus, or it was never committed)") from None
