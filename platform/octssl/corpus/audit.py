"""Whole-corpus checks and summaries: `octssl verify` (every problem in one pass) and `octssl info`."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from octssl.corpus import manifest as mf
from octssl.corpus.icechunk import IcechunkCorpus
from octssl.corpus.journal import Journal
from octssl.corpus.layout import ZARR_NAME
from octssl.errors import CorpusError
from octssl.observe.progress import track
from octssl.sample import ARRAY_KEYS, VOLUME_KEY
from octssl.storage.location import Location, storage_error

if TYPE_CHECKING:
    from octssl.corpus.store import Corpus

LOCALIZER = mf.LOCALIZER_KEY


def verify_corpus(corpus: Corpus, progress: bool = False) -> list[str]:
    """Recompute every checksum and check structure; problems name file and sample. A published corpus
    (on an object store) gets the same checks, its arrays read with range requests.

    Problems that do not put committed data at risk (data without a manifest row) start with
    ``"warning: "``.
    """
    problems = mf.row_problems(corpus.manifest, str(corpus.manifest_path))
    referenced: dict[str, set[int]] = {}
    referenced_localizers: dict[str, set[int]] = {}
    for row in track(corpus.rows, f"verify {corpus.path.name}", progress):
        referenced.setdefault(row["grid"], set()).add(row["index"])
        keys = [*row["modalities"], *row["labels"]]
        if row["localizer_grid"] is not None:
            referenced_localizers.setdefault(row["localizer_grid"], set()).add(row["localizer_index"])
            keys.append(LOCALIZER)
        for key in keys:
            problems += _check_array(corpus, key, row)
    for grid in sorted(set(referenced) | set(_stored_grids(corpus, VOLUME_KEY))):
        problems += _check_bucket(corpus, grid, referenced.get(grid, set()))
    for grid in sorted(set(referenced_localizers) | set(_stored_grids(corpus, LOCALIZER))):
        problems += _check_localizer_bucket(corpus, grid, referenced_localizers.get(grid, set()))
    return problems


def _localizer_shape(grid: str) -> tuple[int, ...] | None:
    """(H, W) of a localizer bucket name "HxW"; None when the name is not one."""
    parts = grid.split("x")
    return tuple(int(n) for n in parts) if len(parts) == 2 and all(n.isdigit() for n in parts) else None


def _expected_shape(key: str, row: dict[str, Any]) -> tuple[int, ...] | None:
    if key == LOCALIZER:
        return _localizer_shape(row["localizer_grid"])
    return tuple(row["shape"]) if key == VOLUME_KEY else (row["shape"][0], row["shape"][2])


def _check_array(corpus: Corpus, key: str, row: dict[str, Any]) -> list[str]:
    try:
        data = corpus.read_array(key, row)
    except CorpusError as err:
        return [str(err)]
    where = corpus.shard_file(key, *corpus.slot(key, row))
    expected = _expected_shape(key, row)
    if data.shape != expected or data.dtype.name != "uint8":
        return [f"{where}: sample {row['id']}: '{key}' is {data.dtype}{data.shape}, expected uint8{expected}"]
    digest = mf.array_sha256(data)
    if digest != (row["sha256"] or {}).get(key):
        return [f"{where}: sample {row['id']}: '{key}' checksum mismatch (manifest "
                f"{str((row['sha256'] or {}).get(key))[:12]}..., data {digest[:12]}...)"]
    return []


def _stored_grids(corpus: Corpus, key: str) -> list[str]:
    if isinstance(corpus, IcechunkCorpus):
        return corpus.stored_grids(key)
    if corpus.remote:  # a published corpus: the buckets are the prefixes holding a zarr.json
        prefix = Location.parse(corpus.zarr_path / key)
        return sorted({f.parent.name for f in prefix.files() if f.name == "zarr.json" and f.parent.parent == prefix})
    root = corpus.folder / ZARR_NAME / key
    return [p.name for p in root.iterdir() if (p / "zarr.json").is_file()] if root.is_dir() else []


def _has_array(corpus: Corpus, key: str, grid: str) -> bool:
    if isinstance(corpus, IcechunkCorpus):
        return corpus.has_array(key, grid)
    return (corpus.zarr_path / key / grid / "zarr.json").is_file()


def _check_bucket(corpus: Corpus, grid: str, referenced: set[int]) -> list[str]:
    """Array shapes, dtypes and equal lengths in one grid bucket; slots no manifest row refers to."""
    problems, lengths = [], {}
    nb, depth, width = (int(n) for n in grid.split("x"))
    for key in ARRAY_KEYS:
        path = corpus.zarr_path / key / grid
        if not _has_array(corpus, key, grid):
            continue
        try:
            arr = corpus.array(key, grid)
        except CorpusError as err:  # damaged metadata: reported, the other arrays still checked
            problems.append(str(err))
            continue
        expected = (nb, depth, width) if key == VOLUME_KEY else (nb, width)
        if tuple(arr.shape[1:]) != expected or arr.dtype.name != "uint8":
            problems.append(f"{path}: array is {arr.dtype}{arr.shape}, expected uint8[N, {expected}]")
        lengths[key] = arr.shape[0]
    if len(set(lengths.values())) > 1:
        problems.append(f"{corpus.zarr_path}: arrays of grid {grid} differ in length: {lengths}")
    return problems + _orphans(corpus, VOLUME_KEY, grid, max(lengths.values(), default=0), referenced)


def _check_localizer_bucket(corpus: Corpus, grid: str, referenced: set[int]) -> list[str]:
    """Shape and dtype of one ``localizer/<H>x<W>`` array; slots no manifest row refers to."""
    path = corpus.zarr_path / LOCALIZER / grid
    if not _has_array(corpus, LOCALIZER, grid):
        return []  # rows pointing here are reported as "array missing" per sample
    expected = _localizer_shape(grid)
    if expected is None:
        return [f"{path}: not a localizer bucket (its name should be HxW)"]
    try:
        arr = corpus.array(LOCALIZER, grid)
    except CorpusError as err:
        return [str(err)]
    problems = []
    if tuple(arr.shape[1:]) != expected or arr.dtype.name != "uint8":
        problems.append(f"{path}: array is {arr.dtype}{arr.shape}, expected uint8[N, {expected}]")
    return problems + _orphans(corpus, LOCALIZER, grid, arr.shape[0], referenced)


def _orphans(corpus: Corpus, key: str, grid: str, stored: int, referenced: set[int]) -> list[str]:
    if not corpus.remote and Journal(corpus.folder, corpus.folder / ZARR_NAME).pending:
        return []  # slots past the committed rows belong to an append still in progress
    orphans = sorted(set(range(stored)) - referenced)
    if not orphans:
        return []
    shown = ", ".join(str(i) for i in orphans[:10]) + (" ..." if len(orphans) > 10 else "")
    return [f"{corpus.zarr_path / key / grid}: {len(orphans)} slot(s) hold data without a manifest "
            f"row (orphans, never served): {shown}"]


def summarize(corpus: Corpus) -> dict[str, Any]:
    """Counts for `octssl info`."""
    rows = corpus.rows
    size = _stored_bytes(Location.parse(corpus.repository if isinstance(corpus, IcechunkCorpus) else corpus.path))
    non_raster = Counter(r["raster_reason"] or r["scan_pattern"] for r in rows if not r["raster"])
    return {
        "path": str(corpus.path),
        "volumes": len(rows),
        "patients": len({r["patient"] for r in rows}),
        "eyes": len({(r["patient"], r["eye"]) for r in rows}),
        "grids": dict(sorted(Counter(r["grid"] for r in rows).items())),
        "splits": {s: sum(r["split"] == s for r in rows) for s in mf.SPLITS},
        "patients_per_split": {s: len({r["patient"] for r in rows if r["split"] == s}) for s in mf.SPLITS},
        # the native localizer is counted with the images so that `octssl info` lists it beside them
        "modalities": {**{k: sum(k in r["modalities"] for r in rows) for k in mf.IMAGE_KEYS},
                       LOCALIZER: sum(r["localizer_grid"] is not None for r in rows)},
        "localizer_grids": dict(sorted(Counter(r["localizer_grid"] for r in rows if r["localizer_grid"]).items())),
        "localizers_registered": sum(r["positions_mm"] is not None for r in rows),
        "labels": {k: sum(k in r["labels"] for r in rows) for k in mf.LABEL_KEYS},
        "labels_train_patients": {
            k: len({r["patient"] for r in rows if r["split"] == "train" and k in r["labels"]})
            for k in mf.LABEL_KEYS
        },
        "raster": sum(r["raster"] for r in rows),
        "non_raster": dict(non_raster),
        # volumes ingest put on a grid finer than the device recorded on some axis (native shape -> grid)
        "upsampled": dict(sorted(Counter(
            f"{r['native_shape']} -> {r['grid']}" for r in rows if r.get("upsampled")).items())),
        "devices": dict(Counter(r["device"] for r in rows)),
        "bytes_on_disk": size,
        "settings": {k: v for k, v in corpus.settings.items() if k != "append_token"},
        **({"snapshot_id": corpus.snapshot_id} if isinstance(corpus, IcechunkCorpus) else {}),
    }


def _stored_bytes(where: Location) -> int:
    """Bytes of every file under ``where`` (a folder or an object-store prefix; an icechunk repository counts
    all its snapshots)."""
    try:
        infos = where.fs.get_file_info(pafs.FileSelector(where.path, recursive=True, allow_not_found=True))
    except OSError as err:
        raise storage_error(where, err) from err
    return sum(info.size for info in infos if info.type == pafs.FileType.File)
