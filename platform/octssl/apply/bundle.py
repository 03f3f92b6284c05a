"""Model bundles: a fine-tuned segmentation model ready to run on new scans, as plain files.

``BUNDLE/model.safetensors`` (the weights, never pickle) and ``BUNDLE/config.json``, one
:class:`BundleConfig`: ``format`` and ``format_version`` (``major.minor``), ``octssl_version`` (who wrote it),
``task``, ``model`` (registry name and build options, width included), ``input`` (the input contract:
normalisation, the en-face size multiple, the training ``grid`` nB x D x W every volume is put on, the
``depth_mm`` window and the training ``spacing_mm`` range), ``threshold`` (chosen once, on the val split,
where the checkpoint was chosen: the best pooled Dice over 0.05..0.95) with ``threshold_source``,
``metrics`` (``val`` at that threshold; ``test``, from a sweep, measured on the chosen trial itself at that
threshold), ``provenance`` (run directory, sweep and trial, corpus and its manifest's sha256, the
training config, the weights' sha256, creation time) and ``exports`` (format 1.2): the same model as
``BUNDLE/model.torchscript.pt`` and ``BUNDLE/model.onnx`` with their sha256 (:mod:`octssl.apply.runtimes`).

Compatibility: a bundle loads in any octssl that reads its format major (a newer minor only adds fields,
which older readers ignore); another major is refused with one line. Format ``octssl-bundle/1`` (before
versions had a minor) reads as 1.0.

:func:`export_model` makes one from a fine-tuning run directory: everything it needs travels with the weights
(the card records the val evaluation that chose them), so no training corpus is opened. A sweep's bundle is
made through :mod:`octssl.tune.bundles`, which passes the sweep's choice and test metrics in as a
:class:`SweepOrigin`. :func:`load_bundle` checks everything before it builds the model and refuses, naming
the bundle and the problem, another format major, weights that differ from the config, or a config that
does not fit.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from octssl import __version__
from octssl.config.job import load_config
from octssl.corpus.manifest import parse_grid
from octssl.errors import ModelError
from octssl.observe.tracking import register_bundle
from octssl.storage.files import sha256_of as _sha256
from octssl.storage.location import Location, absolute, download_files
from octssl.vocab import MASKS, SEGMENTATION

FORMAT, FORMAT_VERSION = "octssl-bundle", "1.3"  # 1.2: TorchScript and ONNX exports; 1.3: the model card
LEGACY_FORMAT = "octssl-bundle/1"  # bundles written before format_version: read as 1.0
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
MULTIPLE = 16


class ModelSpec(BaseModel):
    name: str
    options: dict[str, Any]


class InputContract(BaseModel):
    """What the model was trained on, and so what every input is put on (:class:`~octssl.apply.predictor.Predictor`)."""

    normalisation: str = "z-score per B-scan"
    multiple: int = MULTIPLE
    grid: tuple[int, int, int]
    depth_mm: float = 1.0
    spacing_mm: dict[str, list[float]] | None = None  # {"min": [nB, D, W], "max": [...]} of the training volumes


class SplitMetrics(BaseModel):
    """Metrics of one split at one threshold (:func:`octssl.apply.metrics.pooled`)."""

    model_config = ConfigDict(extra="allow")

    threshold: float | None = None
    dice: float | None = None
    dice_pooled: float | None = None
    hd95_mm: float | None = None
    hd95_undefined: int | None = None
    n: int = 0


class BundleMetrics(BaseModel):
    val: SplitMetrics | None = None
    test: SplitMetrics | None = None


class TrainingData(BaseModel):
    """What the model was trained on (from the weights' card, written by the training loop)."""

    task: str
    label_fraction: float | None = None
    volumes: int | None = None  # training volumes (before crops, ranks and batching)
    patients: int | None = None
    devices: dict[str, int] = {}
    grids: list[str] = []
    spacing_mm: dict[str, list[float]] | None = None
    corpus_version: str | None = None


class ModelCard(BaseModel):
    """The bundle's model card: what it is for, what it learned from, how well, and where it must not be trusted."""

    intended_use: str
    training_data: TrainingData
    metrics: str  # in words, each with the threshold it was measured at
    limitations: list[str]


def model_card(task: str, threshold: float, card: dict[str, Any], label_fraction: float | None,
               metrics: BundleMetrics) -> ModelCard:
    """The model card of a bundle for ``task`` from its weights' ``card`` and metrics."""
    data = card.get("training_data") or {}
    name = {"ga": "geographic atrophy (GA)", "rpd": "reticular pseudodrusen (RPD)"}.get(task, task)

    def said(split: str, m: SplitMetrics | None) -> str:
        if m is None or m.n == 0:
            return f"{split}: not measured"
        parts = [f"pooled Dice {m.dice_pooled:.3f}" if m.dice_pooled is not None else None,
                 f"mean Dice {m.dice:.3f}" if m.dice is not None else None,
                 f"HD95 {m.hd95_mm:.2f} mm" if m.hd95_mm is not None else None]
        return f"{split} ({m.n} volumes, threshold {m.threshold}): " + ", ".join(p for p in parts if p)

    return ModelCard(
        intended_use=(f"Research use: en-face segmentation of {name} from 3D OCT volumes, for measuring lesion "
                      "area and its growth across visits in studies. Not a medical device; not for diagnosis or "
                      "treatment decisions without a clinician's review."),
        training_data=TrainingData(
            task=task, label_fraction=label_fraction, volumes=data.get("volumes"), patients=data.get("patients"),
            devices=data.get("devices") or {}, grids=list(card.get("grid") or []), spacing_mm=card.get("spacing_mm"),
            corpus_version=(card.get("corpus_version") or {}).get("manifest_sha256")),
        metrics=f"probability threshold {threshold} chosen on val; " + "; ".join(
            [said("val", metrics.val), said("test", metrics.test)]),
        limitations=[
            "Trained on the grids, devices and spacings listed under training_data: inputs outside them are "
            "resampled onto the training grid and flagged per prediction, and may be wrong.",
            "Areas are measured on raster scans only; line, circle and radial scans get masks but no area.",
            "Validation and test metrics come from the training corpus's own splits, not from an external site.",
            "Synthetic training corpora (octssl synth) make demonstration models only.",
        ],
    )


class ExportFile(BaseModel):
    """One portable export of the model in the bundle (:mod:`octssl.apply.runtimes`)."""

    file: str
    sha256: str
    opset: int | None = None  # ONNX only


class BundleConfig(BaseModel):
    """config.json of a bundle (fields a newer minor adds are kept and ignored)."""

    model_config = ConfigDict(extra="allow")

    format: str = FORMAT
    format_version: str = FORMAT_VERSION
    octssl_version: str = __version__
    task: str
    model: ModelSpec
    input: InputContract
    threshold: float
    threshold_source: str
    metrics: BundleMetrics
    provenance: dict[str, Any]
    card: ModelCard | None = None  # format 1.3; older bundles have none
    exports: dict[str, ExportFile] = {}  # runtime -> file (format 1.2; older bundles run on torch only)


class SweepOrigin(BaseModel):
    """What a sweep knows about the trial it bundles: where it lies and its test metrics at its threshold."""

    sweep: str
    trial: str
    cell: dict[str, Any]
    threshold: float | None = None  # the trial's val threshold, as the sweep recorded it
    test: SplitMetrics | None = None


@dataclass
class Bundle:
    """A loaded bundle: the model (eval mode, CPU) and its config."""

    path: Path | Location  # the folder, or the URL the bundle was read from
    config: BundleConfig
    model: Any

    @property
    def task(self) -> str:
        return self.config.task

    @property
    def threshold(self) -> float:
        return self.config.threshold

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.config.input.grid



def load_bundle(path: str | Path | Location) -> Bundle:
    """The bundle at ``path`` (a folder or an object-store URL) with its model built and loaded; ModelError
    naming the bundle when refused."""
    where = Location.parse(path)
    if not where.remote:
        return _load(where.local, where)
    with tempfile.TemporaryDirectory(prefix="octssl-bundle-") as folder:
        download_files(where, folder, [CONFIG_NAME, WEIGHTS_NAME])  # one absent is refused below, by name
        return _load(Path(folder), where)


def format_version(config: dict[str, Any], where: Location | str) -> tuple[int, int]:
    """(major, minor) of a bundle's config; ModelError when it is no bundle format or not ``major.minor``."""
    if config.get("format") == LEGACY_FORMAT:
        return 1, 0
    if config.get("format") != FORMAT:
        raise ModelError(f"{where}/{CONFIG_NAME}: format {config.get('format')!r} is not {FORMAT!r}")
    text = str(config.get("format_version"))
    major, _, minor = text.partition(".")
    if not (major.isdigit() and minor.isdigit()):
        raise ModelError(f"{where}/{CONFIG_NAME}: format_version {config.get('format_version')!r} is not major.minor")
    return int(major), int(minor)


def _load(folder: Path, where: Location) -> Bundle:
    """The bundle whose files lie in ``folder``; errors name ``where`` (the folder or the URL it came from)."""
    from octssl.models.registry import build_model
    from octssl.models.transfer import MODEL_KEY, OPTIONS_KEY, load_weights, read_metadata

    config_path, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file() or not weights.is_file():
        raise ModelError(f"{where}: not a model bundle (needs {CONFIG_NAME} and {WEIGHTS_NAME}; make one with "
                         "`octssl export-model`)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{where / CONFIG_NAME}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{where / CONFIG_NAME}: not a JSON object")
    major, minor = format_version(config, where)
    reads = int(FORMAT_VERSION.split(".")[0])
    if major != reads:
        raise ModelError(f"{where}: bundle format {major}.{minor}, this octssl {__version__} reads format {reads}.x: "
                         f"use an octssl that reads format {major}.x, or export the bundle again with this one")
    problems = []
    if config.get("task") not in MASKS:
        problems.append(f"task {config.get('task')!r} is not one of {MASKS}")
    threshold = config.get("threshold")
    if not isinstance(threshold, int | float) or not 0 < threshold < 1:
        problems.append(f"threshold {threshold!r} must lie in (0, 1)")
    grid = (config.get("input") or {}).get("grid")
    if not (isinstance(grid, list) and len(grid) == 3 and all(isinstance(g, int) and g > 0 for g in grid)):
        problems.append(f"input.grid {grid!r} must be three positive integers nB, D, W")
    digest = (config.get("provenance") or {}).get("weights_sha256")
    if digest != _sha256(weights):
        problems.append(f"{WEIGHTS_NAME} is not the file the config was written for (sha256 differs)")
    metadata = read_metadata(weights)
    model_config = config.get("model") or {}
    if (metadata.get(MODEL_KEY), metadata.get(OPTIONS_KEY)) != (model_config.get("name"), model_config.get("options")):
        problems.append(f"config model {model_config.get('name')!r} {model_config.get('options')} differs from the "
                        f"weights' {metadata.get(MODEL_KEY)!r} {metadata.get(OPTIONS_KEY)}")
    if problems:
        raise ModelError(f"{where}: bundle refused: " + "; ".join(problems))
    try:
        typed = BundleConfig.model_validate(config)
    except ValidationError as err:
        first = err.errors()[0]
        raise ModelError(f"{where / CONFIG_NAME}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    model = build_model(typed.model.name, **typed.model.options)
    load_weights(model, weights, scope="all")
    return Bundle(path=where.local if not where.remote else where, config=typed, model=model.eval())


# ---------------------------------------------------------------- export
def _weights_of(run_dir: Path, shown: str) -> Path:
    for name in ("best", "final"):
        if (run_dir / name / WEIGHTS_NAME).is_file():
            return run_dir / name / WEIGHTS_NAME
    raise ModelError(f"{shown}: no best/ or final/ {WEIGHTS_NAME}: not a finished fine-tuning run (a sweep "
                     "directory is exported through its summary.json)")


def export_model(source: str | Path | Location, task: str, out: str | Path | Location, *, overwrite: bool = False,
                 origin: SweepOrigin | None = None, named: str | None = None) -> Path | Location:
    """Write a bundle for ``task`` from a fine-tuning run directory; returns ``out``. Either may be an
    object-store URL (the run's config.yaml and weights are downloaded; the bundle is uploaded with
    config.json last). ``origin``: the sweep whose chosen trial the run is (its test metrics travel into the
    bundle); ``named``: what provenance calls the run (default: the source itself)."""
    where, target = Location.parse(source), Location.parse(out)
    if task not in MASKS:
        raise ModelError(f"--task {task!r}: bundles are for segmentation tasks {MASKS}")
    if (target / CONFIG_NAME).exists() and not overwrite:
        raise ModelError(f"{target}: a bundle is already there (pass --overwrite to replace it)")
    with tempfile.TemporaryDirectory(prefix="octssl-export-") as folder:
        run_dir = Path(folder) / "run" if where.remote else where.local
        if where.remote:
            if not where.is_dir():
                raise ModelError(f"{where}: no such run or sweep directory")
            run_dir.mkdir()
            download_files(where, run_dir, ["config.yaml"])
            if not download_files(where, run_dir, [f"best/{WEIGHTS_NAME}"]):
                download_files(where, run_dir, [f"final/{WEIGHTS_NAME}"])
        elif not run_dir.is_dir():
            raise ModelError(f"{where}: no such run or sweep directory")
        shown = named or (str(where) if where.remote else str(run_dir.resolve()))
        config, weights = bundle_config(run_dir, task, shown, origin)
        exports = Path(folder) / "exports"
        config.exports = _exports(weights, config, exports)
        _write_bundle(target, weights, config, exports)
        files: dict[str, Any] = {WEIGHTS_NAME: weights, CONFIG_NAME: config.model_dump_json(indent=2),
                                 **{e.file: exports / e.file for e in config.exports.values()}}
        register_bundle(files, config.model_dump(mode="json"), run_dir)  # the MLflow registry, when tracking is on
    return target.local if not target.remote else target


def bundle_config(run_dir: Path, task: str, shown: str, origin: SweepOrigin | None = None) -> tuple[BundleConfig, Path]:
    """The bundle config of ``run_dir`` (a local folder, called ``shown``) and the weights file it describes:
    the threshold, grid and val metrics come from the weights' card (written where the checkpoint was
    chosen), test metrics from ``origin``."""
    from octssl.models.transfer import read_metadata

    weights = _weights_of(run_dir, shown)
    if not (run_dir / "config.yaml").is_file():
        raise ModelError(f"{shown}/config.yaml: missing (the run's resolved config)")
    job = load_config(run_dir / "config.yaml")
    objective = job.objective
    if objective.kind != SEGMENTATION or objective.target != task:
        raise ModelError(f"{shown}: the run trained {objective.kind} of {objective.target!r}, not segmentation of "
                         f"{task!r}")
    metadata = read_metadata(weights)
    card = metadata.get("card") or {}
    threshold = card.get("threshold")
    if threshold is None:
        raise ModelError(f"{shown}: {weights.parent.name}/{WEIGHTS_NAME} records no threshold chosen on the val split "
                         f"(no val volumes labelled {task!r} were scored, or the run predates thresholds in weight "
                         "cards): a bundle ships the threshold its checkpoint was chosen with")
    if origin is not None and origin.threshold is not None and abs(origin.threshold - threshold) > 1e-9:
        raise ModelError(f"{shown}: the sweep recorded threshold {origin.threshold}, the weights {threshold}")
    grids = card.get("grid") or []
    if len(grids) != 1:
        raise ModelError(f"{shown}: the weights were trained on grids {grids}: a bundle needs one input grid")
    val = card.get("val") or {}
    version = card.get("corpus_version") or {}
    provenance: dict[str, Any] = {"run_dir": shown}
    if origin is not None:
        provenance |= {"sweep": origin.sweep, "trial": origin.trial, "cell": origin.cell}
    provenance |= {
        "weights_sha256": _sha256(weights),
        "corpus": absolute(job.data.corpus) if job.data.corpus else None,
        "corpus_manifest_sha256": version.get("manifest_sha256"),
        # the training corpus's pseudonym-key fingerprint: predict on device files must use the same key
        "key_fingerprint": card.get("key_fingerprint"),
        "training_config": yaml.safe_load((run_dir / "config.yaml").read_text()),
        "created": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
    }
    n_val = int(card.get("val_volumes") or 0)
    config = BundleConfig(
        task=task, model=ModelSpec(name=metadata["octssl.model"], options=metadata["octssl.options"]),
        input=InputContract(grid=parse_grid(grids[0]), spacing_mm=card.get("spacing_mm")),
        threshold=float(threshold),
        threshold_source=f"best pooled Dice on the val split ({n_val} volumes), where the checkpoint was chosen "
                         f"(step {card.get('summary', {}).get('step')})",
        metrics=BundleMetrics(
            val=SplitMetrics(threshold=threshold, dice=val.get("dice"), dice_pooled=val.get("dice_pooled"), n=n_val),
            test=origin.test if origin is not None else None),
        provenance=provenance,
    )
    config.card = model_card(task, float(threshold), card, job.objective.label_fraction, config.metrics)
    return config, weights


def _exports(weights: Path, config: BundleConfig, folder: Path) -> dict[str, ExportFile]:
    """TorchScript and ONNX exports of the weights' model written into ``folder``, each describing itself with
    the config's task, threshold and input contract and the weights' card."""
    from octssl.apply.runtimes import export_metadata, write_exports
    from octssl.models.transfer import model_from_weights, read_metadata

    folder.mkdir(parents=True, exist_ok=True)
    described = {**config.model_dump(mode="json"), "weights_card": read_metadata(weights).get("card")}
    written = write_exports(model_from_weights(weights), config.input.grid, config.input.multiple, folder,
                            export_metadata(described))
    return {kind: ExportFile(**entry) for kind, entry in written.items()}


def _write_bundle(out: Location, weights: Path, config: BundleConfig, exports: Path) -> None:
    """Put the weights, the exports (the files in ``exports``) and config.json at ``out`` whole or not at all:
    a local folder is renamed into place; on an object store the old config.json goes first and the new one
    is uploaded last (no config.json, no bundle)."""
    text = config.model_dump_json(indent=2)
    files = [(WEIGHTS_NAME, weights)] + [(entry.file, exports / entry.file) for entry in config.exports.values()]
    if out.remote:
        (out / CONFIG_NAME).delete()
        for name, path in files:
            (out / name).upload(path)
        (out / CONFIG_NAME).write_bytes(text.encode())
        return
    folder = out.local
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    for name, path in files:
        shutil.copyfile(path, staging / name)
    (staging / CONFIG_NAME).write_text(text)
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)
