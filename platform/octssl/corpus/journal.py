"""Crash safety for corpus appends: a writer lock and an undo journal for the Zarr shard files.

An append writes volumes into ``volumes.zarr`` first and commits by replacing ``manifest.parquet``.
With the sharding codec, new volumes whose slots fall in a shard that already holds committed volumes
make Zarr rewrite that whole shard file, so a crash there could damage committed data. Before an append
first touches an array, the journal copies the array's ``zarr.json`` and the one shard file at its current
end (the only existing shard an append can touch) into ``.journal/`` and records the array's length.
Recovery (on the next append, or on open when no writer holds the lock) compares the journal's token with
the token in the committed manifest: if they match the append committed and the journal is dropped;
otherwise the backups are restored, shard files past the old end are deleted and new arrays removed.

Chosen over "start every append at a fresh shard boundary": that would need no copies, but many small
appends (one per ingested file) would leave many small shard files, against the few-large-files layout.
The cost here is one copy of at most one shard per array per append.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from octssl.errors import CorpusError
from octssl.storage.files import atomic_write

JOURNAL_DIR = ".journal"
LOCK_NAME = ".lock"
_BY_HAND = ("run `octssl verify` on the corpus: if it reports no damaged volume, delete the corpus's "
            f"{JOURNAL_DIR} folder by hand; otherwise restore the corpus from a backup")


class WriterLock:
    """An exclusive, non-blocking ``flock`` on the corpus directory itself; the kernel drops it if the writer dies.

    The directory, unlike a lock file, cannot be unlinked and recreated under a writer (a deleted lock file
    would let a second writer in). ``<corpus>/.lock`` only tells who holds the lock, for the error message.
    """

    def __init__(self, corpus_dir: Path) -> None:
        self.dir = corpus_dir
        self.path = corpus_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> WriterLock:
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                holder = self.path.read_text(errors="replace").strip()[:32] or "unknown"
            except OSError:
                holder = "unknown"
            raise CorpusError(
                f"{self.path}: another writer (pid {holder}) is appending to this corpus; "
                "wait for it to finish (appends are not concurrent)"
            ) from None
        self._fd = fd
        with contextlib.suppress(OSError):  # a read-only corpus can still be locked by a reader
            self.path.write_text(str(os.getpid()))
        return self

    def try_acquire(self) -> bool:
        """Acquire if free; False (without raising) when another process holds it."""
        try:
            self.acquire()
        except CorpusError:
            return False
        return True

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class Journal:
    """The undo journal of one append to the Zarr group at ``<corpus>/volumes.zarr``."""

    def __init__(self, corpus_dir: Path, zarr_dir: Path) -> None:
        self.dir = corpus_dir / JOURNAL_DIR
        self.zarr_dir = zarr_dir
        self.state: dict[str, Any] = {}

    @property
    def pending(self) -> bool:
        return (self.dir / "journal.json").is_file()

    def begin(self) -> str:
        """Start a journal for a new append; returns the token the manifest will carry once committed."""
        if self.dir.exists():
            shutil.rmtree(self.dir)
        (self.dir / "files").mkdir(parents=True)
        self.state = {"token": uuid.uuid4().hex, "arrays": {}}
        self._save()
        return self.state["token"]

    def protect(self, array_path: str, length: int, shard_len: int, exists: bool) -> None:
        """Back up what an append may change in ``array_path`` before it is first written."""
        if array_path in self.state["arrays"]:
            return
        entry: dict[str, Any] = {"length": length, "shard_len": shard_len, "created": not exists, "backups": []}
        if exists:
            array_dir = self.zarr_dir / array_path
            backups = [array_dir / "zarr.json"]
            if length % shard_len:
                backups += sorted((array_dir / "c" / str(length // shard_len)).rglob("*"))
            entry["backups"] += self._back_up(backups)
        self.state["arrays"][array_path] = entry
        self._save()  # write-ahead: recorded before the array is touched

    def _back_up(self, sources: list[Path]) -> list[str]:
        """Durable copies of the existing files among ``sources`` under the journal; their Zarr-relative names."""
        saved = []
        for src in sources:
            if src.is_file():
                rel = src.relative_to(self.zarr_dir).as_posix()
                dst = self.dir / "files" / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                _durable_copy(src, dst)
                saved.append(rel)
        return saved

    def owned(self) -> bool:
        """Whether the journal on disk is still this append's (nobody removed or replaced it)."""
        try:
            return json.loads((self.dir / "journal.json").read_text())["token"] == self.state.get("token")
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def protect_shards(self, array_path: str, length: int, shard_len: int, shards: list[int]) -> None:
        """Back up ``zarr.json`` and the given shard files of an existing array before they are rewritten in
        place (an attach changes slots anywhere in the array, not only at its end)."""
        if array_path in self.state["arrays"]:
            raise CorpusError(f"{self.zarr_dir / array_path}: journal already protects this array")
        array_dir = self.zarr_dir / array_path
        entry: dict[str, Any] = {"length": length, "shard_len": shard_len, "created": False, "backups": []}
        sources = [array_dir / "zarr.json"]
        for shard in shards:
            sources += sorted((array_dir / "c" / str(shard)).rglob("*"))
        entry["backups"] += self._back_up(sources)
        # A shard file absent now (all its chunks empty) must be absent again after a rollback.
        entry["absent"] = [f"{array_path}/c/{s}" for s in shards if not (array_dir / "c" / str(s)).exists()]
        self.state["arrays"][array_path] = entry
        self._save()

    def finish(self) -> None:
        """Drop the journal after the manifest committed."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def recover(self, committed_token: str | None) -> str:
        """Finish or undo an interrupted append; returns "committed", "rolled back" or "none"."""
        if not self.pending:
            if self.dir.exists():
                shutil.rmtree(self.dir)  # crashed before the journal was written: nothing touched
            return "none"
        path = self.dir / "journal.json"
        try:
            self.state = json.loads(path.read_text())
            self.state["token"], self.state["arrays"].items()
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CorpusError(f"{path}: unreadable journal of an interrupted append ({err}); {_BY_HAND}") from None
        if self.state["token"] == committed_token:
            self._drop_partials()
            self.finish()
            return "committed"
        self.rollback()
        return "rolled back"

    def rollback(self) -> None:
        """Restore every array to its state before the append (idempotent: safe to rerun after a crash)."""
        missing: list[Path] = []
        for array_path, entry in self.state["arrays"].items():
            array_dir = self.zarr_dir / array_path
            if entry["created"]:
                shutil.rmtree(array_dir, ignore_errors=True)
                continue
            first_new_shard = -(-entry["length"] // entry["shard_len"])
            chunk_root = array_dir / "c"
            if chunk_root.is_dir():
                for shard_dir in chunk_root.iterdir():
                    if shard_dir.name.isdigit() and int(shard_dir.name) >= first_new_shard:
                        shutil.rmtree(shard_dir, ignore_errors=True)
            for rel in entry["backups"]:
                backup = self.dir / "files" / rel
                if not backup.is_file():
                    missing.append(backup)
                    continue
                _restore(backup, self.zarr_dir / rel)
            for rel in entry.get("absent", []):
                shutil.rmtree(self.zarr_dir / rel, ignore_errors=True)
        self._drop_partials()
        if missing:
            raise CorpusError(f"{missing[0]}: backup of the interrupted append is missing"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}, so the append "
                              f"cannot be undone automatically; {_BY_HAND}")
        self.finish()

    def _drop_partials(self) -> None:
        for array_path in self.state.get("arrays", {}):
            array_dir = self.zarr_dir / array_path
            if array_dir.is_dir():
                for partial in array_dir.rglob("*.partial"):
                    partial.unlink(missing_ok=True)

    def _save(self) -> None:
        atomic_write(self.dir / "journal.json", json.dumps(self.state))


def _durable_copy(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with dst.open("rb+") as handle:
        os.fsync(handle.fileno())


def _restore(backup: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.restore")
    target.parent.mkdir(parents=True, exist_ok=True)
    _durable_copy(backup, tmp)
    os.replace(tmp, target)
