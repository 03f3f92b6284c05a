"""`octssl predict`: a model bundle run on a corpus or on device files; per-volume PNGs and a predictions table.

Sources: one corpus directory (all its volumes, or ``split``/``ids``), or device files and folders read
through the ingest readers (pseudonymised with ``OCTSSL_PSEUDONYM_KEY`` like ingest, raster volumes put
on the bundle's training grid, nothing written to any corpus). Files are spread over Ray tasks when a Ray
cluster is there (as ingest does), else read in this process; volumes are predicted in batches.

``OUT/volumes/<id>/``: ``prob.png`` (probability x 255) and ``mask.png`` (0/255) of the volume's en-face
``(nB, W)`` grid drawn at its physical aspect ratio (a line or circle scan as a band), ``mask_grid.png``
(the mask itself, one pixel per A-scan), and ``overlay.png``
(the scanned region drawn on the native localizer, the lesion in red at each lesion A-scan's position
there; over the OCT mean projection when the volume has no localizer); see ``octssl.ingest.pictures``.
``OUT/predictions.parquet`` and ``.csv``: one row per volume (see ``COLUMNS``).
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from octssl.errors import OctsslError, PredictError
from octssl.storage.files import atomic_write
from octssl.storage.location import Location, absolute

COLUMNS = ("id", "patient", "eye", "visit", "acquired", "scan_pattern", "raster", "split", "source", "task",
           "threshold", "area_mm2", "area_reason", "lesions", "pixels", "label_area_mm2", "dice", "hd95_mm")
_BUNDLES: dict[tuple[Any, ...], Any] = {}  # per process: a Ray worker loads a bundle once


@dataclass
class PredictReport:
    out: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    executor: str = "inline"


@dataclass
class Item:
    """One volume to predict: its sample dict (with ``localizer`` and registration when known) and source."""

    sample: dict[str, Any]
    source: str


def _segmenter(bundle_path: str, batch_size: int) -> tuple[Any, Any]:
    from octssl.apply.bundle import load_bundle
    from octssl.apply.predictor import Segmenter

    where = Location.parse(bundle_path)
    stamps = tuple((where / name).info().mtime_ns or 0 for name in ("config.json", "model.safetensors"))
    key = (bundle_path, stamps, batch_size)  # a bundle replaced in place is loaded again
    if key not in _BUNDLES:
        bundle = load_bundle(bundle_path)
        _BUNDLES[key] = (bundle, Segmenter(bundle.model, depth=bundle.grid[1], batch_size=batch_size))
    return _BUNDLES[key]


def predict_items(bundle_path: str, items: list[Item], batch_size: int = 4) -> list[tuple[dict[str, Any], dict[str, bytes]]]:
    """Rows and PNG files (name -> bytes) of ``items``."""
    from octssl.apply.predictor import measure

    bundle, segmenter = _segmenter(bundle_path, batch_size)
    samples = [item.sample for item in items]
    probs = segmenter.probabilities([s["oct"] for s in samples], [s["meta"]["spacing_mm"] for s in samples],
                                    [bool(s["meta"].get("raster", True)) for s in samples])
    results = []
    for item, prob in zip(items, probs, strict=True):
        sample, meta = item.sample, item.sample["meta"]
        row = {"id": sample["id"], "patient": meta.get("patient"), "eye": meta.get("eye"), "visit": meta.get("visit"),
               "acquired": meta.get("acquired"), "scan_pattern": meta.get("scan_pattern"),
               "raster": bool(meta.get("raster", True)), "split": meta.get("split"), "source": item.source,
               "task": bundle.task, "threshold": bundle.threshold,
               **measure(prob, bundle.threshold, meta, sample.get(bundle.task))}
        results.append((row, pictures(sample, prob, bundle.threshold)))
    return results


def pictures(sample: dict[str, Any], prob: np.ndarray, threshold: float) -> dict[str, bytes]:
    """prob.png, mask.png and overlay.png of one volume, pictures at the physical aspect ratio of its spacing
    (a line or circle scan's single row drawn as a band, not one pixel high); and mask_grid.png, the mask
    itself, one pixel per A-scan of the ``(nB, W)`` grid (the data, for programs)."""
    from octssl.ingest.pictures import enface_image, png

    mask = prob >= threshold
    spacing = sample["meta"]["spacing_mm"]
    enface = (spacing[0], spacing[2])
    return {"prob.png": png(enface_image(np.rint(np.clip(prob, 0, 1) * 255).astype(np.uint8), enface)),
            "mask.png": png(enface_image(mask, enface, mask=True)), "overlay.png": png(overlay(sample, mask)),
            "mask_grid.png": png(mask.astype(np.uint8) * 255)}


def overlay(sample: dict[str, Any], mask: np.ndarray) -> np.ndarray:
    """RGB: the localizer with the scanned region drawn and the lesion A-scans in red at their places (or,
    without a localizer, the lesion over the OCT mean projection), at the physical aspect ratio."""
    from octssl.ingest.pictures import LESION_COLOUR, enface_image, scan_on_localizer

    meta = sample["meta"]
    localizer, positions = sample.get("localizer"), meta.get("positions_mm")
    if localizer is None or positions is None or meta.get("localizer_spacing_mm") is None:
        spacing = meta["spacing_mm"]
        grey = enface_image(np.asarray(sample["oct"], np.float32).mean(axis=1), (spacing[0], spacing[2]))
        lesion = enface_image(mask, (spacing[0], spacing[2]), mask=True) > 0
        rgb = np.stack([grey] * 3, axis=-1).astype(np.float32)
        rgb[lesion] = 0.5 * rgb[lesion] + 0.5 * np.array(LESION_COLOUR, np.float32)
        return rgb.astype(np.uint8)
    return scan_on_localizer(localizer, meta["localizer_spacing_mm"], positions, mask.shape[1], meta["scan_pattern"],
                             meta["eye"], lesion=mask)


# ---------------------------------------------------------------- device files
def predict_file(bundle_path: str, path: str, key: bytes, batch_size: int = 4) -> tuple[list[Any], str | None]:
    """Read one device file or stack through the ingest readers and predict its volumes; (results, reason)."""
    from octssl.ingest import detect
    from octssl.ingest.convert import ID_PREFIX, read_scans, to_record

    bundle, _ = _segmenter(bundle_path, batch_size)
    try:
        unit = Path(path)
        sha = detect.content_hash(unit)
        fmt = detect.detect_format(unit)
        items = []
        for scan in read_scans(unit, fmt):
            record = to_record(scan, sample_id=f"{ID_PREFIX[fmt]}-{sha[:16]}-{scan.series}", source=sha, key=key,
                               grid=bundle.grid, depth_mm=float(bundle.config["input"].get("depth_mm", 1.0)))
            sample = dict(record.sample)
            sample["meta"] = {**sample["meta"], "localizer_spacing_mm": record.localizer_spacing_mm,
                              "positions_mm": record.positions_mm}
            if record.localizer is not None:
                sample["localizer"] = record.localizer
            items.append(Item(sample, path))
    except OctsslError as err:
        return [], str(err)
    except Exception as err:  # noqa: BLE001 - a reader bug on one odd file must not stop the others
        return [], f"reader failed ({type(err).__name__}: {err})"
    return predict_items(bundle_path, items, batch_size), None


# ---------------------------------------------------------------- the command
def predict(bundle_path: str | Path, sources: Sequence[str | Path], out: str | Path, *, split: str | None = None,
            ids: list[str] | None = None, batch_size: int = 4, ephemeral_key: bool = False,
            progress: bool = True) -> PredictReport:
    """Run the bundle (a folder or a URL) on ``sources`` (one corpus, a folder or a published corpus's URL, or
    device files/folders); write ``out`` (a local folder); return the report."""
    from octssl.corpus.icechunk import is_repository, split_snapshot
    from octssl.corpus.layout import ZARR_NAME
    from octssl.observe.progress import stage

    start = time.perf_counter()
    bundle_file = absolute(bundle_path)
    _segmenter(bundle_file, batch_size)  # refuse a bad bundle before anything else
    out = Location.parse(out).local
    report = PredictReport(out=str(out))
    places = [Location.parse(s) for s in sources]
    corpus_mode = len(places) == 1 and (places[0].remote or (places[0].local / ZARR_NAME).is_dir()
                                         or split_snapshot(places[0])[1] is not None or is_repository(places[0]))
    if not corpus_mode and any(p.remote for p in places):
        raise PredictError(f"{next(p for p in places if p.remote)}: device files are read from local paths; a URL "
                           "source must be one published corpus")
    paths = [p.local for p in places] if not corpus_mode else []
    if not corpus_mode and (split or ids):
        raise PredictError("--split/--ids select volumes of a corpus; the sources here are device files")
    out.mkdir(parents=True, exist_ok=True)

    def save(results: list[tuple[dict[str, Any], dict[str, bytes]]]) -> None:
        for row, files in results:
            folder = out / "volumes" / row["id"]
            folder.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                atomic_write(folder / name, data)
            report.rows.append(row)

    if corpus_mode:
        from octssl.corpus.store import Corpus

        corpus = Corpus.open(places[0])
        chosen = ids if ids else corpus.ids(split=split, raster_only=False)
        unknown = [i for i in chosen if i not in corpus]
        if unknown:
            raise PredictError(f"{places[0]}: no volume(s) {unknown[:5]} in this corpus")
        with stage("predict", len(chosen), progress) as advance:
            for begin in range(0, len(chosen), batch_size):
                part = chosen[begin : begin + batch_size]
                items = [Item(corpus.read(i, localizer=True), str(places[0])) for i in part]
                save(predict_items(bundle_file, items, batch_size))
                advance(len(part))
    else:
        report.executor = _device_files(bundle_file, paths, batch_size, ephemeral_key, progress, save, report)
    _write_table(out, report.rows)
    report.seconds = time.perf_counter() - start
    return report


def _device_files(bundle_path: str, sources: list[Path], batch_size: int, ephemeral_key: bool, progress: bool,
                  save: Any, report: PredictReport) -> str:
    from concurrent.futures import FIRST_COMPLETED, wait

    from octssl.ingest.detect import discover
    from octssl.ingest.phi import load_key
    from octssl.ingest.pipeline import unit_executor
    from octssl.observe.progress import stage

    key, _ = load_key(ephemeral_key)
    units = [str(u) for u in discover(sources)]
    with unit_executor(1) as (submit, kind), stage("predict", len(units), progress) as advance:
        pending = {submit(predict_file, bundle_path, unit, key, batch_size): unit for unit in units}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                unit = pending.pop(future)
                results, reason = future.result()
                if reason is not None:
                    report.rejected.append((unit, reason))
                save(results)
                advance()
    return kind


def _write_table(out: Path, rows: list[dict[str, Any]]) -> None:
    import csv

    rows = sorted(rows, key=lambda r: r["id"])
    table = pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema=SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write(out / "predictions.parquet", buffer.getvalue())
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    for row in table.to_pylist():
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    atomic_write(out / "predictions.csv", text.getvalue())


SCHEMA = pa.schema([
    ("id", pa.string()), ("patient", pa.string()), ("eye", pa.string()), ("visit", pa.int64()),
    ("acquired", pa.string()), ("scan_pattern", pa.string()), ("raster", pa.bool_()), ("split", pa.string()),
    ("source", pa.string()), ("task", pa.string()), ("threshold", pa.float64()), ("area_mm2", pa.float64()),
    ("area_reason", pa.string()), ("lesions", pa.int64()), ("pixels", pa.int64()),
    ("label_area_mm2", pa.float64()), ("dice", pa.float64()),
    ("hd95_mm", pa.float64()),
])
