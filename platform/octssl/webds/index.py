"""The index of a WebDataset export: its file names, format tag, the metadata a sample may carry out of the
corpus, and ``index.json`` (per shard: count, bytes, sha256, ids; per sample: shard, byte range, digests).

The byte ranges let :class:`octssl.data.sources.StreamSource` read any sample with one seek; the digests
(the corpus manifest's sha256 of each array) let it check every sample it decodes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from octssl.errors import ShardError
from octssl.storage import Location

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


def load_index(shards_dir: str | Path | Location) -> dict[str, Any]:
    """The parsed ``index.json`` of a shard directory or prefix; ShardError naming the file when missing or bad."""
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


def is_shard_dir(path: str | Path | Location) -> bool:
    """Whether ``path`` (a folder or an object-store prefix) looks like an export (it has an index.json)."""
    return (Location.parse(path) / INDEX_NAME).is_file()
