"""`octssl predict`: a model bundle run on a corpus or on device files; per-volume PNGs and a predictions table.

Sources: one corpus directory (all its volumes, or ``split``/``ids``), or device files and folders read
through the ingest readers (pseudonymised with ``OCTSSL_PSEUDONYM_KEY`` like ingest, raster volumes put
on the bundle's training grid, nothing written to any corpus). Files are spread over Ray tasks when a Ray
cluster is there (as ingest does), else read in this process; volumes are predicted in batches.

``OUT/volumes/<id>/`` (``formats`` chooses): ``png``: ``prob.png`` (probability x 255) and ``mask.png`` (0/255)
of the volume's en-face ``(nB, W)`` grid drawn at its physical aspect ratio (a line or circle scan as a band),
``mask_grid.png`` (the mask itself, one pixel per A-scan), and ``overlay.png`` (the scanned region drawn on the
native localizer, the lesion in red at each lesion A-scan's position there; over the OCT mean projection when
the volume has no localizer); see ``octssl.ingest.pictures``. ``nifti``: ``prob.nii.gz`` and ``mask.nii.gz``
with the en-face geometry (:mod:`octssl.apply.outputs`); ``dicom-seg``: ``seg.dcm``, a DICOM-SEG referencing
the source series, for volumes read from DICOM files.
``OUT/predictions.parquet`` and ``.csv``: one row per volume (see ``COLUMNS``). ``OUT/rejects.parquet``: every
input that could not be read (path, reason, time UTC), as ingest's. An ``OUT`` holding a previous run's
outputs is refused unless ``overwrite`` (then those outputs are removed first, so no two runs ever mix).

``runtime`` runs the bundle's model in torch (the training precision policy), or its TorchScript or ONNX
export (onnxruntime, CPU provider) on the CPU in fp32 (:mod:`octssl.apply.runtimes`).
"""

from __future__ import annotations

import csv
import io
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from octssl.apply.bundle import load_bundle
from octssl.apply.outputs import (
    dicom_seg_bytes,
    enface_geometry,
    nifti_files,
    read_dicom_header,
    require_highdicom,
)
from octssl.apply.rows import COLUMNS, SCHEMA, PredictionRow
from octssl.apply.runtimes import TORCH
from octssl.corpus.icechunk import is_repository, split_snapshot
from octssl.corpus.layout import ZARR_NAME
from octssl.corpus.store import Corpus
from octssl.errors import OctsslError, PredictError
from octssl.ingest import detect
from octssl.ingest.convert import ID_PREFIX, read_scans, to_record
from octssl.ingest.detect import find_units
from octssl.ingest.phi import check_key, load_key
from octssl.ingest.pictures import LESION_COLOUR, enface_image, png, scan_on_localizer
from octssl.ingest.pipeline import DEFAULT_GRID, unit_executor
from octssl.observe.progress import stage
from octssl.storage.files import atomic_write
from octssl.storage.location import Location, absolute, download_files

_BUNDLES: dict[tuple[Any, ...], Any] = {}  # per process: a Ray worker loads a bundle once
PNG, NIFTI, DICOM_SEG = "png", "nifti", "dicom-seg"
FORMATS = (PNG, NIFTI, DICOM_SEG)
DEFAULT_FORMATS = (PNG, NIFTI)  # dicom-seg on request: it carries the source's patient and study identifiers


@dataclass
class PredictReport:
    out: str
    rows: list[PredictionRow] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    executor: str = "inline"


@dataclass
class Item:
    """One volume to predict: its sample dict (with ``localizer`` and registration when known), its source
(the device file's path, or the corpus) and the source file's sha256 when the sample's meta lacks it."""

    sample: dict[str, Any]
    source: str
    dicom: Any = None  # the source OPT header (pixels not read) when the file is DICOM: what a DICOM-SEG refers to


def _segmenter(bundle_path: str, batch_size: int, runtime: str = TORCH) -> tuple[Any, Any]:
    """The bundle at ``bundle_path`` and its :class:`~octssl.apply.predictor.Predictor` (inputs put on the
    bundle's grid) for ``runtime``, loaded once per process."""
    from octssl.apply.predictor import Predictor

    where = Location.parse(bundle_path)
    stamps = tuple((where / name).info().mtime_ns or 0 for name in ("config.json", "model.safetensors"))
    key = (bundle_path, stamps, batch_size, runtime)  # a bundle replaced in place is loaded again
    if key not in _BUNDLES:
        bundle = load_bundle(bundle_path)
        if runtime == TORCH:
            _BUNDLES[key] = (bundle, Predictor.for_model(bundle.model, grid=bundle.grid, batch_size=batch_size), None)
        else:
            import torch

            from octssl.models.precision import resolve_precision

            model, download = _export_model(bundle, runtime)
            _BUNDLES[key] = (bundle, Predictor(model, precision=resolve_precision("auto", gpu=False),
                                               device=torch.device("cpu"), grid=bundle.grid, batch_size=batch_size),
                             download)
    bundle, predictor, _ = _BUNDLES[key]
    return bundle, predictor


def _export_model(bundle: Any, runtime: str) -> tuple[Any, Any]:
    """The bundle's ``runtime`` export loaded, and the temporary folder it was downloaded to when the bundle
    is a URL (None for a local bundle; the folder goes when the process lets go of it)."""

    from octssl.apply.runtimes import runtime_model

    exports = {kind: entry.model_dump() for kind, entry in bundle.config.exports.items()}
    folder, download = bundle.path, None
    if isinstance(bundle.path, Location) and runtime in exports:
        download = tempfile.TemporaryDirectory(prefix="octssl-export-")
        download_files(bundle.path, download.name, [exports[runtime]["file"]])
        folder = Path(download.name)
    return runtime_model(runtime, Path(folder), exports, bundle.model, str(bundle.path)), download


def outside_training(bundle: Any, meta: dict[str, Any], shape: tuple[int, ...]) -> str | None:
    """One line when a volume lies outside what the bundle's model was trained on (a scan pattern other than
    raster, or a spacing on the model's grid more than 10% outside the training range); else None."""
    if not meta.get("raster", True):
        return f"{meta.get('scan_pattern')} scan: the model was trained on raster volumes"
    trained = bundle.config.input.spacing_mm
    if not trained:
        return None
    n_b, depth, width = shape
    g_b, g_d, g_w = bundle.grid
    s = meta["spacing_mm"]
    seen = (s[0] * (n_b - 1) / (g_b - 1) if g_b > 1 and n_b > 1 else s[0], s[1] * depth / g_d, s[2] * width / g_w)
    off = [f"{axis} {value:.4g} mm not in [{low:.4g}, {high:.4g}]"
           for axis, value, low, high in zip(("nB", "D", "W"), seen, trained["min"], trained["max"], strict=True)
           if not 0.9 * low <= value <= 1.1 * high]
    return f"spacing on the model grid outside training: {', '.join(off)}" if off else None


def predict_items(bundle_path: str, items: list[Item], batch_size: int = 4, runtime: str = TORCH,
                  formats: Sequence[str] = DEFAULT_FORMATS) -> list[tuple[PredictionRow, dict[str, bytes]]]:
    """Rows and output files (name -> bytes) of ``items``."""

    from octssl.apply.metrics import measure

    bundle, predictor = _segmenter(bundle_path, batch_size, runtime)
    samples = [item.sample for item in items]
    rasters = [bool(s["meta"].get("raster", True)) for s in samples]
    probs = predictor.probabilities([s["oct"] for s in samples], [s["meta"]["spacing_mm"] for s in samples], rasters)
    weights_sha256 = bundle.config.provenance.get("weights_sha256")
    results = []
    for item, prob, raster in zip(items, probs, rasters, strict=True):
        sample, meta = item.sample, item.sample["meta"]
        shape = tuple(int(n) for n in np.shape(sample["oct"]))
        seen = predictor.input_shape(shape, raster)
        warning = outside_training(bundle, meta, shape)
        if warning:
            logging.getLogger("octssl.predict").warning("%s: %s", sample["id"], warning)
        row = PredictionRow(
            id=sample["id"], patient=meta.get("patient"), eye=meta.get("eye"), visit=meta.get("visit"),
            acquired=meta.get("acquired"), scan_pattern=meta.get("scan_pattern"), raster=raster,
            split=meta.get("split"), source=item.source, source_sha256=meta.get("source"), task=bundle.task,
            threshold=bundle.threshold, **measure(prob, bundle.threshold, meta, sample.get(bundle.task)),
            bundle=str(bundle.path), weights_sha256=weights_sha256, input_grid="x".join(map(str, seen)),
            grid="x".join(map(str, shape)), spacing_mm=[float(v) for v in meta["spacing_mm"]],
            native_shape=meta.get("native_shape"), warning=warning)
        results.append((row, volume_files(item, prob, bundle.task, bundle.threshold, formats)))
    return results


def volume_files(item: Item, prob: np.ndarray, task: str, threshold: float, formats: Sequence[str]) -> dict[str, bytes]:
    """The files of one predicted volume in ``formats`` (a DICOM-SEG only for a volume read from DICOM)."""

    files = pictures(item.sample, prob, threshold) if PNG in formats else {}
    if NIFTI in formats or (DICOM_SEG in formats and item.dicom is not None):
        geometry = enface_geometry(item.sample["meta"], prob.shape, int(np.shape(item.sample["oct"])[1]), item.dicom)
        if NIFTI in formats:
            files |= nifti_files(prob, threshold, geometry, task)
        if DICOM_SEG in formats and item.dicom is not None:
            files["seg.dcm"] = dicom_seg_bytes(item.dicom, prob >= threshold, geometry, task, threshold)
    return files


def pictures(sample: dict[str, Any], prob: np.ndarray, threshold: float) -> dict[str, bytes]:
    """prob.png, mask.png and overlay.png of one volume, pictures at the physical aspect ratio of its spacing
    (a line or circle scan's single row drawn as a band, not one pixel high); and mask_grid.png, the mask
    itself, one pixel per A-scan of the ``(nB, W)`` grid (the data, for programs)."""

    mask = prob >= threshold
    spacing = sample["meta"]["spacing_mm"]
    enface = (spacing[0], spacing[2])
    return {"prob.png": png(enface_image(np.rint(np.clip(prob, 0, 1) * 255).astype(np.uint8), enface)),
            "mask.png": png(enface_image(mask, enface, mask=True)), "overlay.png": png(overlay(sample, mask)),
            "mask_grid.png": png(mask.astype(np.uint8) * 255)}


def overlay(sample: dict[str, Any], mask: np.ndarray) -> np.ndarray:
    """RGB: the localizer with the scanned region drawn and the lesion A-scans in red at their places (or,
    without a localizer, the lesion over the OCT mean projection), at the physical aspect ratio."""

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
def predict_file(bundle_path: str, path: str, key: bytes, batch_size: int = 4, runtime: str = TORCH,
                 formats: Sequence[str] = DEFAULT_FORMATS) -> tuple[list[Any], str | None]:
    """Read one device file or stack through the ingest readers and predict its volumes; (results, reason)."""

    bundle, _ = _segmenter(bundle_path, batch_size, runtime)
    try:
        unit = Path(path)
        sha = detect.content_hash(unit)
        fmt = detect.detect_format(unit)
        header = read_dicom_header(unit) if fmt == detect.DICOM and DICOM_SEG in formats else None
        items = []
        for scan in read_scans(unit, fmt):
            # exactly what `octssl ingest` stores (its default grid and depth window): a device file and its
            # corpus entry are then the same volume, and the Predictor puts both on the bundle's grid
            record = to_record(scan, sample_id=f"{ID_PREFIX[fmt]}-{sha[:16]}-{scan.series}", source=sha, key=key,
                               grid=DEFAULT_GRID, depth_mm=bundle.config.input.depth_mm)
            sample = dict(record.sample)
            sample["meta"] = {**sample["meta"], "localizer_spacing_mm": record.localizer_spacing_mm,
                              "positions_mm": record.positions_mm}
            if record.localizer is not None:
                sample["localizer"] = record.localizer
            items.append(Item(sample, path, dicom=header))
    except OctsslError as err:
        return [], str(err)
    except Exception as err:  # noqa: BLE001 - a reader bug on one odd file must not stop the others
        return [], f"reader failed ({type(err).__name__}: {err})"
    return predict_items(bundle_path, items, batch_size, runtime, formats), None


# ---------------------------------------------------------------- the command
def predict(bundle_path: str | Path, sources: Sequence[str | Path], out: str | Path, *, split: str | None = None,
            ids: list[str] | None = None, batch_size: int = 4, ephemeral_key: bool = False,
            progress: bool = True, overwrite: bool = False, runtime: str = TORCH,
            formats: Sequence[str] = DEFAULT_FORMATS) -> PredictReport:
    """Run the bundle (a folder or a URL) on ``sources`` (one corpus, a folder or a published corpus's URL, or
    device files/folders) in ``runtime``; write ``out`` (a local folder; a previous run's outputs there only
    with ``overwrite``, which replaces them whole) in ``formats``; return the report."""

    start = time.perf_counter()
    bundle_file = absolute(bundle_path)
    formats = check_formats(formats)
    _segmenter(bundle_file, batch_size, runtime)  # refuse a bad bundle or runtime before anything else
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
    _prepare_out(out, overwrite)

    def save(results: list[tuple[PredictionRow, dict[str, bytes]]]) -> None:
        for row, files in results:
            folder = out / "volumes" / row.id
            folder.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                atomic_write(folder / name, data)
            report.rows.append(row)

    if corpus_mode:
        corpus = Corpus.open(places[0])
        chosen = ids if ids else corpus.ids(split=split, raster_only=False)
        unknown = [i for i in chosen if i not in corpus]
        if unknown:
            raise PredictError(f"{places[0]}: no volume(s) {unknown[:5]} in this corpus")
        with stage("predict", len(chosen), progress) as advance:
            for begin in range(0, len(chosen), batch_size):
                part = chosen[begin : begin + batch_size]
                items = [Item(corpus.read(i, localizer=True), str(places[0])) for i in part]
                save(predict_items(bundle_file, items, batch_size, runtime, formats))
                advance(len(part))
    else:
        report.executor = _device_files(bundle_file, paths, batch_size, ephemeral_key, progress, save, report,
                                        runtime, formats)
    _write_table(out, report.rows)
    _write_rejects(out, report.rejected)
    report.seconds = time.perf_counter() - start
    return report


def check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """``formats`` (each may be a comma-separated list) as a tuple of known formats; PredictError naming an
    unknown one, or the package to install for one whose library is missing."""
    chosen = tuple(dict.fromkeys(f.strip() for text in formats for f in str(text).split(",") if f.strip()))
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        raise PredictError(f"--format {', '.join(unknown) or '(none)'}: choose from {', '.join(FORMATS)}")
    if DICOM_SEG in chosen:
        require_highdicom()
    return chosen


def _device_files(bundle_path: str, sources: list[Path], batch_size: int, ephemeral_key: bool, progress: bool,
                  save: Any, report: PredictReport, runtime: str, formats: Sequence[str]) -> str:


    key, _ = load_key(ephemeral_key, command="predict")
    bundle, _ = _segmenter(bundle_path, batch_size)
    check_key(bundle.config.provenance.get("key_fingerprint"), key, bundle_path, "predict on device files",
              what="this bundle's training corpus")
    found, unusable = find_units(sources)  # FIFOs, device files, broken links: reported, never opened
    report.rejected.extend(unusable)
    units = [str(u) for u in found]
    with unit_executor(1) as (submit, kind), stage("predict", len(units), progress) as advance:
        pending = {submit(predict_file, bundle_path, unit, key, batch_size, runtime, formats): unit for unit in units}
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


OUTPUTS = ("predictions.parquet", "predictions.csv", "rejects.parquet", "volumes")  # tables first: see below


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that holds a previous run's outputs (its table would list new volumes beside old
    pictures) unless ``overwrite``; then remove them, tables first, so a half-replaced folder has no table."""

    if out.exists() and not out.is_dir():
        raise PredictError(f"{out}: is a file, not a folder for predictions")
    present = [name for name in OUTPUTS if (out / name).exists()]
    if present and not overwrite:
        raise PredictError(f"{out}: already holds a prediction run ({', '.join(present)}); pass --overwrite to "
                           "replace it, or choose another --out")
    for name in present:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _write_rejects(out: Path, rejected: list[tuple[str, str]]) -> None:
    """``rejects.parquet``: every input this run could not read (path, reason, time UTC), written even when
    empty so that the folder tells a clean run from an unfinished one."""

    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    table = pa.Table.from_pylist([{"path": p, "reason": r, "time": now} for p, r in sorted(rejected)],
                                 schema=pa.schema([("path", pa.string()), ("reason", pa.string()), ("time", pa.string())]))
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write(out / "rejects.parquet", buffer.getvalue())


def _write_table(out: Path, rows: list[PredictionRow]) -> None:
    rows = sorted(rows, key=lambda r: r.id)
    table = pa.Table.from_pylist([r.model_dump() for r in rows], schema=SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write(out / "predictions.parquet", buffer.getvalue())
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    for row in table.to_pylist():
        writer.writerow({k: "" if v is None else "x".join(map(str, v)) if k == "native_shape" else
                         " ".join(map(str, v)) if k == "spacing_mm" else v for k, v in row.items()})
    atomic_write(out / "predictions.csv", text.getvalue())
