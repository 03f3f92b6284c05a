"""Corpus layout: file names, where a row's arrays live (grid bucket, slot, shard file), the sample meta of a
manifest row, and how a sample is checked and converted before it is stored. A leaf module: the corpus,
its writer and its audit all import it, and it imports none of them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from typing import Any

import numpy as np

from octssl.corpus import manifest as mf
from octssl.errors import CorpusError, SampleError
from octssl.sample import ARRAY_KEYS, MASKS, VOLUME_KEY, validate_sample

ZARR_NAME = "volumes.zarr"
MAX_CHUNKS_PER_SHARD = 1024  # bounds the shard index (16 bytes per chunk) for small en-face arrays
REQUIRED_META = ("patient", "eye", "visit", "device", "scan_pattern", "spacing_mm")


def assign_split(patient: str, ratios: list[float] | tuple[float, ...]) -> str:
    """Deterministic split of a patient pseudonym from a hash: the same patient always lands the same."""
    digest = hashlib.sha256(f"octssl-split:{patient}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    total, bound = float(sum(ratios)), 0.0
    for name, ratio in zip(mf.SPLITS, ratios, strict=True):
        bound += ratio / total
        if position < bound:
            return name
    return mf.SPLITS[-1]


def kinds_of(row: dict[str, Any]) -> set[str]:
    """What a raster row gives a task: a volume (pretraining) and its labels (fine-tuning that label)."""
    return {VOLUME_KEY, *row["labels"]} if row["raster"] else set()


def _holders(rows: list[dict[str, Any]]) -> dict[str, dict[str, set[str]]]:
    """{split: {kind: patients}} over ``rows``."""
    held: dict[str, dict[str, set[str]]] = {split: {} for split in mf.SPLITS}
    for row in rows:
        for kind in kinds_of(row):
            held[row["split"]].setdefault(kind, set()).add(row["patient"])
    return held


def fill_splits(committed: list[dict[str, Any]], new: list[dict[str, Any]], hashed: set[str],
                ratios: list[float] | tuple[float, ...]) -> None:
    """Move new, hash-assigned patients (``hashed``) of the rows ``new`` into a split (ratio above 0) that would
    otherwise hold no volume, or no volume with a label another split has, taking them only from a split that
    keeps another patient of everything the moved one brings. Changes nothing when hashing already gave every
    split what a task needs (so large corpora, and corpora with given splits, keep their assignment); a corpus
    too small to fill every split stays as it is, and ``octssl info`` / ``finetune`` say so."""
    if not hashed:
        return
    wanted = [split for split, ratio in zip(mf.SPLITS, ratios, strict=True) if ratio > 0]
    mine: dict[str, list[dict[str, Any]]] = {}
    for row in new:
        if row["patient"] in hashed:
            mine.setdefault(row["patient"], []).append(row)
    brings = {patient: set().union(*(kinds_of(row) for row in rows)) for patient, rows in mine.items()}
    order = sorted(mine, key=lambda p: hashlib.sha256(f"octssl-fill:{p}".encode()).hexdigest())
    while True:
        held = _holders(committed + new)
        kinds = sorted({kind for split in held.values() for kind in split})

        move = next(((patient, target) for target in wanted for kind in kinds if not held[target].get(kind)
                     for patient in order if _movable(mine[patient][0]["split"], patient, brings[patient], kind,
                                                      target, held)), None)
        if move is None:
            return
        patient, target = move
        for row in mine[patient]:
            row["split"] = target
        order.remove(patient)  # each patient moves at most once: the loop ends


def _movable(source: str, patient: str, brings: set[str], kind: str, target: str,
             held: dict[str, dict[str, set[str]]]) -> bool:
    """Whether moving ``patient`` from ``source`` brings ``kind`` to ``target`` while ``source`` keeps another
    patient of everything this one brings."""
    return (source != target and kind in brings
            and all(held[source].get(k, set()) - {patient} for k in brings))


def labelled_per_split(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """{label: {split: raster volumes with that label}} (every label and split listed, zeros included)."""
    counts = {label: dict.fromkeys(mf.SPLITS, 0) for label in MASKS}
    for row in rows:
        if row["raster"]:
            for label in row["labels"]:
                counts[label][row["split"]] += 1
    return counts


def split_shortfall(rows: list[dict[str, Any]], label: str, where: Any, needs: tuple[str, ...] = ("train", "val")) -> str | None:
    """Why fine-tuning ``label`` cannot be done honestly on these rows (a split among ``needs`` without a
    labelled raster volume), with the counts and what to do; None when every split has some."""
    counts = labelled_per_split(rows)[label]
    missing = [split for split in needs if counts[split] == 0]
    if not missing:
        return None
    patients = len({row["patient"] for row in rows if row["raster"] and label in row["labels"]})
    per_split = ", ".join(f"{split} {n}" for split, n in counts.items())
    advice = (f"the corpus is too small: {patients} labelled patient(s), and a split needs patients of its own; "
              "label volumes of more patients") if patients < len(needs) else (
              "its labelled patients all fell into other splits; label volumes of more patients (or ingest the "
              "labels with the volumes, which fills empty splits)")
    return (f"{where}: no {'/'.join(missing)} volume labelled {label!r} (labelled per split: {per_split}): "
            f"{'training' if 'train' in missing else 'the checkpoint and threshold choice'} would rest on nothing; "
            + advice)


def shard_length(bytes_per_volume: int, shard_bytes: int) -> int:
    """Volumes per shard so that a full shard holds about ``shard_bytes`` before compression."""
    return int(min(MAX_CHUNKS_PER_SHARD, max(1, shard_bytes // max(1, bytes_per_volume))))


def array_path(key: str, grid: str) -> str:
    return f"{key}/{grid}"


def slot(key: str, row: dict[str, Any]) -> tuple[str, int]:
    """(grid, index) of array ``key`` of a manifest row: the localizer has buckets of its own."""
    if key == mf.LOCALIZER_KEY:
        return row["localizer_grid"], row["localizer_index"]
    return row["grid"], row["index"]


def present(row: dict[str, Any]) -> set[str]:
    """Array keys a manifest row holds data for (images, masks, and the localizer when stored)."""
    extra = {mf.LOCALIZER_KEY} if row["localizer_grid"] is not None else set()
    return set(row["modalities"]) | set(row["labels"]) | extra


def meta_of(row: dict[str, Any]) -> dict[str, Any]:
    """The sample ``meta`` dict of a manifest row."""
    acquired = row["acquired"]
    return {
        "patient": row["patient"],
        "eye": row["eye"],
        "visit": row["visit"],
        "device": row["device"],
        "scan_pattern": row["scan_pattern"],
        "spacing_mm": tuple(row["spacing_mm"]),
        "split": row["split"],
        "grid": row["grid"],
        "labels": list(row["labels"]),
        "modalities": list(row["modalities"]),
        "raster": row["raster"],
        "source": row["source"],
        "acquired": acquired.isoformat() if isinstance(acquired, dt.date) else None,
        "native_shape": None if row.get("native_shape") is None else [int(n) for n in row["native_shape"].split("x")],
    }


def to_uint8(key: str, array: np.ndarray, at: str) -> np.ndarray:
    """Stored form of a sample array: uint8 as is; float32 in [0, 1] scaled to 0..255 (masks: >= 0.5)."""
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    low, high = float(array.min(initial=0.0)), float(array.max(initial=0.0))
    if low < 0.0 or high > 1.0:
        raise SampleError(f"{at}: float32 '{key}' must lie in [0, 1] to be stored as uint8, got [{low}, {high}]")
    if key in MASKS:
        return (array >= 0.5).astype(np.uint8)
    return np.rint(array * 255.0).astype(np.uint8)


def prepared_sample(sample: dict[str, Any], where: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Validate a sample for appending; returns its uint8 arrays and its checked meta."""
    validate_sample(sample, where)
    at = f"{where}: sample {sample['id']}"
    meta = dict(sample.get("meta") or {})
    missing = [k for k in REQUIRED_META if meta.get(k) is None]
    if missing:
        raise SampleError(f"{at}: meta lacks {missing}")
    for key in ("patient", "device", "scan_pattern"):
        if not isinstance(meta[key], str) or not meta[key].strip():
            raise SampleError(f"{at}: meta {key!r} must be a non-empty string, got {meta[key]!r}")
    visit = meta["visit"]
    if isinstance(visit, bool) or not isinstance(visit, (int, np.integer)) or not 0 <= visit < 2**31:
        raise SampleError(f"{at}: meta 'visit' must be an integer in 0..2**31-1, got {visit!r}")
    meta["visit"] = int(visit)
    meta["acquired"] = _acquired_day(meta.get("acquired"), at)
    if meta["eye"] not in mf.EYES:
        raise SampleError(f"{at}: meta 'eye' is {meta['eye']!r}, expected one of {mf.EYES}")
    if meta.get("split") is not None and meta["split"] not in mf.SPLITS:
        raise SampleError(f"{at}: meta 'split' is {meta['split']!r}, expected one of {mf.SPLITS}")
    spacing = [float(s) for s in meta["spacing_mm"]]
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise SampleError(f"{at}: meta 'spacing_mm' must be 3 positive numbers, got {meta['spacing_mm']}")
    meta["spacing_mm"] = spacing
    if min(np.shape(sample[VOLUME_KEY])) < 1:
        raise SampleError(f"{at}: 'oct' has an empty axis, shape {np.shape(sample[VOLUME_KEY])}")
    arrays = {k: to_uint8(k, np.asarray(sample[k]), at) for k in ARRAY_KEYS if k in sample}
    return arrays, meta


def _acquired_day(value: object, at: str) -> dt.date | None:
    """``meta["acquired"]`` as a date: None, a date, a datetime or an ISO ``YYYY-MM-DD...`` string."""
    if value is None or (isinstance(value, dt.date) and not isinstance(value, dt.datetime)):
        return value
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value[:10])
        except ValueError:
            pass
    raise SampleError(f"{at}: meta 'acquired' must be a real date (YYYY-MM-DD) or None, got {value!r}")


def label_fraction_patients(rows: list[dict[str, Any]], label: str, fraction: float, seed: Any,
                            where: Any) -> list[str]:
    """Nested, deterministic subset of the train patients of ``rows`` having ``label``: round(f x n), at least 1.

    Patients are ranked by a hash seeded with the corpus's ``fraction_seed``, and a fraction takes a prefix
    of that ranking, so the patients of fraction 0.1 are among those of 0.2, and so on. CorpusError (naming
    ``where``, the corpus) for an unknown label, a fraction outside (0, 1] or no labelled train patient.
    """
    if label not in MASKS:
        raise CorpusError(f"{where}: unknown label {label!r}; expected one of {MASKS}")
    if not 0 < fraction <= 1:
        raise CorpusError(f"{where}: label fraction must lie in (0, 1], got {fraction}")
    labelled = {r["patient"] for r in rows if r["split"] == "train" and label in r["labels"]}
    if not labelled:
        raise CorpusError(f"{where}: no train patient has label {label!r}")
    ranked = sorted(labelled, key=lambda p: hashlib.sha256(f"{seed}:{label}:{p}".encode()).hexdigest())
    count = max(1, math.floor(fraction * len(ranked) + 0.5))
    return sorted(ranked[:count])
