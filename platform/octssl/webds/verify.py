"""``verify_shards``: every problem of a WebDataset export in one pass (the index against the tars)."""

from __future__ import annotations

import fnmatch
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from octssl.errors import ShardError
from octssl.observe.progress import stage
from octssl.storage.location import Location
from octssl.webds.index import INDEX_NAME, file_sha256, index_problems, read_index, well_formed_shard
from octssl.webds.read import decode_sample, read_sample


def verify_shards(shards_dir: str | Path | Location, progress: bool = False) -> list[str]:
    """Every problem of an export (a folder or an object-store prefix) in one pass: missing/truncated
    shards, checksums, counts; each named. Objects are downloaded one at a time to check them."""
    root = Location.parse(shards_dir)
    try:
        index = read_index(root)
    except ShardError as err:
        return [str(err)]
    problems = index_problems(index, root)
    if not isinstance(index.get("shards"), list) or not isinstance(index.get("samples"), dict):
        return problems
    shards = [shard for shard in index["shards"] if well_formed_shard(shard)]
    listed = {shard["name"] for shard in shards}
    problems += [f"{p}: not listed in {INDEX_NAME}" for p in root.files()
                 if p.parent == root and fnmatch.fnmatch(p.name, "shard-*.tar") and p.name not in listed]
    with stage(f"verify {root.name}", sum(shard["count"] for shard in shards), progress) as advance:
        for shard in shards:
            where = root / shard["name"]
            if not where.remote:
                problems += _shard_problems(where.local, shard, index["samples"])
            elif not where.is_file():
                problems.append(_missing(where, shard))
            else:
                with tempfile.TemporaryDirectory(prefix="octssl-verify-") as staging:
                    local = where.download(Path(staging) / shard["name"])
                    problems += [p.replace(str(local), str(where))
                                 for p in _shard_problems(local, shard, index["samples"])]
            advance(shard["count"])
    return problems


def _shard_problems(path: Path, shard: dict[str, Any], samples: dict[str, Any]) -> list[str]:
    if not path.is_file():
        return [_missing(path, shard)]
    problems: list[str] = []
    size = path.stat().st_size
    if size < shard["bytes"]:
        problems.append(f"{path}: truncated tar ({size} of {shard['bytes']} bytes)")
    elif size != shard["bytes"]:
        problems.append(f"{path}: {size} bytes, index says {shard['bytes']}")
    if file_sha256(path) != shard["sha256"]:
        problems.append(f"{path}: tar sha256 mismatch")
    found = _tar_samples(path, problems)
    if len(found) != shard["count"]:
        problems.append(f"{path}: holds {len(found)} samples, index says {shard['count']}")
    for sid in shard["ids"]:
        if sid not in found:
            problems.append(f"{path}: sample {sid}: missing from the tar")
            continue
        entry = samples.get(sid)
        try:
            decode_sample(found[sid], sid, entry.get("sha256") if isinstance(entry, dict) else None, str(path))
            if isinstance(entry, dict) and _usable(entry, shard):  # the reader's way in: the indexed byte range
                with open(path, "rb") as handle:
                    read_sample(handle, entry, sid, str(path))
        except ShardError as err:
            problems.append(str(err))
    problems += [f"{path}: sample {sid}: in the tar but not in the index" for sid in found if sid not in shard["ids"]]
    return problems


def _missing(path: Path | Location, shard: dict[str, Any]) -> str:
    return (f"{path}: missing ({shard['count']} samples: {', '.join(shard['ids'][:5])}"
            f"{', ...' if shard['count'] > 5 else ''})")


def _usable(entry: Any, shard: dict[str, Any]) -> bool:
    """Whether an entry's byte range is sane enough to read (index_problems reports it otherwise)."""
    return (isinstance(entry, dict) and entry.get("shard") == shard["name"]
            and all(isinstance(entry.get(k), int) and entry[k] >= 0 for k in ("offset", "size"))
            and entry["offset"] + entry["size"] <= shard["bytes"])


def _tar_samples(path: Path, problems: list[str]) -> dict[str, dict[str, memoryview]]:
    """All complete records of a tar grouped by key; a damaged tail is reported, the readable head kept."""
    found: dict[str, dict[str, memoryview]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in _members(tar):
                if member.isfile():
                    handle = tar.extractfile(member)
                    data = handle.read() if handle is not None else b""
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"record {member.name} is cut short")
                    key, _, ext = member.name.partition(".")
                    found.setdefault(key, {})[ext] = memoryview(data)
    except (tarfile.TarError, OSError) as err:
        problems.append(f"{path}: unreadable after {sum(len(v) for v in found.values())} records "
                        f"(truncated or corrupt tar): {err}")
    return found


def _members(tar: tarfile.TarFile) -> Iterable[tarfile.TarInfo]:
    while (member := tar.next()) is not None:
        yield member
