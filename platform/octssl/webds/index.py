"""The index of a WebDataset export: its file names, format tag, the metadata a sample may carry out of the
corpus, and ``index.json`` (per shard: count, bytes, sha256, ids; per sample: shard, byte range, digests).

The byte ranges let :class:`octssl.data.sources.StreamSource` read any sample with one seek; the digests
(the corpus manifest's sha256 of each array) let it check every sample it decodes.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from octssl.errors import ShardError
from octssl.storage.location import Location

INDEX_NAME = "index.json"
FORMAT = "octssl-shards/1"
SHARD_PATTERN = "shard-{:06d}.tar"
#: The sample ``meta`` keys written to shards and served by both sources (docs/data.md).
META_KEYS = ("patient", "eye", "visit", "device", "scan_pattern", "spacing_mm", "split", "grid", "labels",
             "modalities", "raster")


def shard_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The part of a sample's ``meta`` that may leave the corpus (JSON-ready, manifest fields only)."""
    out = {key: meta[key] for key in META_KEYS if key in meta}
    if "spacing_mm" in out:
        out["spacing_mm"] = tuple(float(s) for s in out["spacing_mm"])
    return out


def file_sha256(path: str | Path | Location) -> str:
    """The sha256 of a local file or an object (streamed in 4 MiB blocks)."""
    digest = hashlib.sha256()
    with Location.parse(path).open_input() as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_index(shards_dir: str | Path | Location) -> dict[str, Any]:
    """The parsed ``index.json`` of a shard directory or object-store prefix, its format checked (not yet
    its content)."""
    path = Location.parse(shards_dir) / INDEX_NAME
    try:
        index = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ShardError(f"{path}: missing (not a shard directory, or the export did not finish)") from None
    except (OSError, ValueError) as err:
        raise ShardError(f"{path}: unreadable: {err}") from err
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ShardError(f"{path}: format is {index.get('format') if isinstance(index, dict) else None!r}, "
                         f"expected {FORMAT!r}")
    return index


def load_index(shards_dir: str | Path | Location) -> dict[str, Any]:
    """The parsed and checked ``index.json`` of a shard directory; ShardError naming the file and its first
    problem when it is missing, malformed or inconsistent (a reader trusts its byte ranges only then)."""
    index = read_index(shards_dir)
    problems = index_problems(index, Location.parse(shards_dir))
    if problems:
        more = f" (and {len(problems) - 1} more; `octssl verify {shards_dir}` lists them)" if len(problems) > 1 else ""
        raise ShardError(problems[0] + more)
    return index


def index_problems(index: dict[str, Any], shards_dir: Path | Location) -> list[str]:
    """Every inconsistency of an index by itself: malformed entries, shard names outside the folder, samples
    listed by no shard or by a shard without an entry, byte ranges outside their shard, counts."""
    where = shards_dir / INDEX_NAME
    shards, samples = index.get("shards"), index.get("samples")
    if not isinstance(shards, list) or not isinstance(samples, dict):
        return [f"{where}: 'shards' must be a list and 'samples' a mapping"]
    problems: list[str] = []
    owner: dict[str, dict[str, Any]] = {}
    for number, shard in enumerate(shards):
        if not well_formed_shard(shard):
            problems.append(f"{where}: shard entry {number} is malformed (needs a name shard-NNNNNN.tar, bytes, "
                            "and count equal to its number of ids)")
            continue
        for sid in shard["ids"]:
            if sid in owner:
                problems.append(f"{where}: sample {sid}: listed by both {owner[sid]['name']} and {shard['name']}")
            owner[sid] = shard
    for sid, shard in owner.items():
        entry = samples.get(sid)
        if not isinstance(entry, dict):
            problems.append(f"{where}: sample {sid}: listed in {shard['name']} but has no entry in 'samples'")
            continue
        if entry.get("shard") != shard["name"]:
            problems.append(f"{where}: sample {sid}: entry names shard {entry.get('shard')!r}, but "
                            f"{shard['name']} lists it")
        offset, size = entry.get("offset"), entry.get("size")
        if not (isinstance(offset, int) and isinstance(size, int) and _count(offset) and _count(size) and size > 0
                and offset % 512 == 0 and offset + size <= shard["bytes"]):
            problems.append(f"{where}: sample {sid}: byte range (offset {offset!r}, size {size!r}) lies outside "
                            f"{shard['name']} ({shard['bytes']} bytes)")
        digests = entry.get("sha256")
        if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
            problems.append(f"{where}: sample {sid}: 'sha256' must map array names to hex digests")
    problems += [f"{where}: sample {sid}: has an entry in 'samples' but no shard lists it"
                 for sid in samples if sid not in owner]
    if index.get("total") != len(owner):
        problems.append(f"{where}: total says {index.get('total')!r}, the shards list {len(owner)} samples")
    return problems


_SHARD_NAME = re.compile(r"shard-\d{6}\.tar")


def well_formed_shard(shard: object) -> bool:
    """Whether a shard entry of an index has a safe name (a file in the folder), byte size, ids and count."""
    return (isinstance(shard, dict) and isinstance(shard.get("name"), str)
            and _SHARD_NAME.fullmatch(shard["name"]) is not None and _count(shard.get("bytes"))
            and isinstance(shard.get("ids"), list) and shard.get("count") == len(shard["ids"])
            and all(isinstance(sid, str) for sid in shard["ids"]))


def _count(value: object) -> bool:
    """A non-negative int (JSON has no other integers; bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_shard_dir(path: str | Path | Location) -> bool:
    """Whether ``path`` (a folder or an object-store prefix) looks like an export (an index.json, or shard
    tars whose index is gone)."""
    where = Location.parse(path)
    if (where / INDEX_NAME).is_file():
        return True
    if where.remote:
        return any(f.parent == where and f.name.startswith("shard-") for f in where.files())
    return any(where.local.glob("shard-*.tar"))
