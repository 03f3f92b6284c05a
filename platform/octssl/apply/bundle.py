"""Model bundles: a fine-tuned segmentation model ready to run on new scans, as two plain files.

``BUNDLE/model.safetensors`` (the weights, never pickle) and ``BUNDLE/config.json``: ``format``,
``octssl_version``, ``task``, ``model`` (registry name and build options, width included), ``input``
(normalisation, the en-face size multiple, the training ``grid`` nB x D x W and ``depth_mm`` window that
device files are put on), ``threshold`` (the probability threshold with the best pooled Dice on the val
split, over 0.05..0.95) with ``threshold_source``, ``metrics`` (``val`` at that threshold; ``test`` from
the sweep when the bundle comes from one) and ``provenance`` (run directory, sweep and trial, corpus path
and the sha256 of its manifest, the training config, the weights' sha256, creation time).

:func:`export_model` makes one from a fine-tuning run directory or from a sweep directory (the cell of
``task`` whose chosen trial has the best pooled val Dice); :func:`load_bundle` checks everything before it builds
the model and refuses, naming the bundle and the problem, a bundle of another octssl version, another
format, weights that differ from the config, or a config that does not fit.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from octssl import __version__
from octssl.corpus.manifest import manifest_sha256
from octssl.errors import ModelError
from octssl.observe.tracking import register_bundle
from octssl.storage.location import Location, absolute, download_files
from octssl.vocab import MASKS, SEGMENTATION, VAL

FORMAT = "octssl-bundle/1"
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
MULTIPLE = 16


@dataclass
class Bundle:
    """A loaded bundle: the model (eval mode, CPU) and its config."""

    path: Path | Location  # the folder, or the URL the bundle was read from
    config: dict[str, Any]
    model: Any

    @property
    def task(self) -> str:
        return self.config["task"]

    @property
    def threshold(self) -> float:
        return float(self.config["threshold"])

    @property
    def grid(self) -> tuple[int, int, int]:
        nb, depth, width = (int(v) for v in self.config["input"]["grid"])
        return nb, depth, width


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_bundle(path: str | Path | Location) -> Bundle:
    """The bundle at ``path`` (a folder or an object-store URL) with its model built and loaded; ModelError
    naming the bundle when refused."""
    where = Location.parse(path)
    if not where.remote:
        return _load(where.local, where)
    with tempfile.TemporaryDirectory(prefix="octssl-bundle-") as folder:
        download_files(where, folder, [CONFIG_NAME, WEIGHTS_NAME])  # one absent is refused below, by name
        return _load(Path(folder), where)


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
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelError(f"{where / CONFIG_NAME}: format {config.get('format') if isinstance(config, dict) else None!r} "
                         f"is not {FORMAT!r}")
    if config.get("octssl_version") != __version__:
        raise ModelError(f"{where}: bundle made by octssl {config.get('octssl_version')}, this is octssl "
                         f"{__version__}: export it again with this version")
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
    model = build_model(model_config["name"], **model_config["options"])
    load_weights(model, weights, scope="all")
    return Bundle(path=where.local if not where.remote else where, config=config, model=model.eval())


# ---------------------------------------------------------------- export
def _run_of(source: Path, task: str, summary: dict[str, Any] | None, shown: str) -> tuple[Path, dict[str, Any]]:
    """The fine-tuning run to bundle and what is known about it (sweep, trial, test metrics); ``shown``
    names ``source`` (its URL when it was downloaded) in errors and provenance."""
    summary_path = source / "summary.json"
    if summary is None and summary_path.is_file() and (source / "trials").is_dir():  # a sweep directory
        summary = json.loads(summary_path.read_text())
    if summary is not None:
        cells = [c for c in summary.get("cells", []) if c.get("task") == task and c.get("best_config")]
        if not cells:
            raise ModelError(f"{shown}: the sweep has no finished cell for task {task!r}")
        cell = max(cells, key=lambda c: c["best_config"]["val_dice_pooled"])
        trial = cell["best_config"]["trial"]
        test = {"dice": cell.get("dice_mean"), "hd95_mm": cell.get("hd95_mean"), "n": cell.get("n_test"),
                "seeds": cell.get("n_seeds")}
        extra = {"sweep": shown, "trial": trial, "run_dir": f"{shown}/trials/{trial}",
                 "cell": {k: cell[k] for k in ("task", "fraction", "init", "model")}}
        return source / "trials" / trial, {"test": test, "provenance": extra}
    return source, {"test": None, "provenance": {"run_dir": shown}}


def _weights_of(run_dir: Path, shown: str) -> Path:
    for name in ("best", "final"):
        if (run_dir / name / WEIGHTS_NAME).is_file():
            return run_dir / name / WEIGHTS_NAME
    raise ModelError(f"{shown}: no best/ or final/ {WEIGHTS_NAME}: not a finished fine-tuning run (or a sweep "
                     "directory with summary.json)")


def export_model(source: str | Path | Location, task: str, out: str | Path | Location, *, overwrite: bool = False,
                 summary: dict[str, Any] | None = None, named: str | None = None) -> Path | Location:
    """Write a bundle for ``task`` from a fine-tuning run directory or a sweep directory; returns ``out``.
    Either may be an object-store URL (the source's few files needed are downloaded; the bundle is uploaded
    with config.json last). ``summary``: the sweep's summary when it is not on disk yet (the sweep itself, at
    its end); ``named``: what provenance calls the source (default: the source itself)."""
    where, target = Location.parse(source), Location.parse(out)
    if task not in MASKS:
        raise ModelError(f"--task {task!r}: bundles are for segmentation tasks {MASKS}")
    if (target / CONFIG_NAME).exists() and not overwrite:
        raise ModelError(f"{target}: a bundle is already there (pass --overwrite to replace it)")
    with tempfile.TemporaryDirectory(prefix="octssl-export-") as folder:
        local = Path(folder) / "source" if where.remote else where.local
        if where.remote and where.is_dir():
            local.mkdir()
            if (where / "trials").is_dir():  # a sweep directory: its summary, then the chosen trial's run
                (local / "trials").mkdir()
                if summary is None:
                    download_files(where, local, ["summary.json"])
        if not local.is_dir():
            raise ModelError(f"{where}: no such run or sweep directory")
        shown = named or (str(where) if where.remote else str(local.resolve()))
        run_dir, known = _run_of(local, task, summary, shown)
        if where.remote:
            relative = run_dir.relative_to(local).as_posix()
            remote_run = where if relative == "." else where / relative
            download_files(remote_run, run_dir, ["config.yaml"])
            if not download_files(remote_run, run_dir, [f"best/{WEIGHTS_NAME}"]):
                download_files(remote_run, run_dir, [f"final/{WEIGHTS_NAME}"])
        config, weights = _bundle_config(run_dir, task, known)
        _write_bundle(target, weights, config)
        register_bundle({WEIGHTS_NAME: weights, CONFIG_NAME: json.dumps(config, indent=2, default=str)}, config,
                        local)  # the MLflow model registry, when tracking is on (octssl.observe.tracking)
    return target.local if not target.remote else target


def _bundle_config(run_dir: Path, task: str, known: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    """config.json of the bundle of ``run_dir`` (a local folder) and the weights file it describes."""
    from octssl.config.job import load_config
    from octssl.corpus.store import Corpus
    from octssl.models.transfer import model_from_weights, read_metadata

    weights = _weights_of(run_dir, known["provenance"]["run_dir"])
    if not (run_dir / "config.yaml").is_file():
        raise ModelError(f"{known['provenance']['run_dir']}/config.yaml: missing (the run's resolved config)")
    job = load_config(run_dir / "config.yaml")
    objective = job.objective
    if objective.kind != SEGMENTATION or objective.target != task:
        raise ModelError(f"{known['provenance']['run_dir']}: the run trained {objective.kind} of "
                         f"{objective.target!r}, not segmentation of {task!r}")
    corpus_path = job.data.corpus or ""
    try:
        corpus = Corpus.open(corpus_path)
    except Exception as err:  # noqa: BLE001 - any reason the corpus cannot be read is reported the same way
        raise ModelError(f"{known['provenance']['run_dir']}: the training corpus {corpus_path} cannot be opened to "
                         f"choose the threshold on its val split ({err})") from None
    card = read_metadata(weights).get("card") or {}
    grid = _grid(card, corpus)
    val = _val_threshold(model_from_weights(weights), corpus, task, grid[1])
    metadata = read_metadata(weights)
    config = {
        "format": FORMAT, "octssl_version": __version__, "task": task,
        "model": {"name": metadata["octssl.model"], "options": metadata["octssl.options"]},
        "input": {"normalisation": "z-score per B-scan", "multiple": MULTIPLE, "grid": list(grid),
                  "depth_mm": 1.0},
        "threshold": val.pop("threshold"), "threshold_source": f"best pooled Dice on the val split ({val['n']} volumes)",
        "metrics": {VAL: val, "test": known["test"]},
        "provenance": {
            **known["provenance"], "weights_sha256": _sha256(weights),
            "corpus": absolute(corpus_path), "corpus_manifest_sha256": manifest_sha256(corpus.path),
            "training_config": yaml.safe_load((run_dir / "config.yaml").read_text()),
            "created": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        },
    }
    return config, weights


def _write_bundle(out: Location, weights: Path, config: dict[str, Any]) -> None:
    """Put the two files at ``out`` whole or not at all: a local folder is renamed into place; on an object
    store the old config.json goes first and the new one is uploaded last (no config.json, no bundle)."""
    text = json.dumps(config, indent=2, default=str)
    if out.remote:
        (out / CONFIG_NAME).delete()
        (out / WEIGHTS_NAME).upload(weights)
        (out / CONFIG_NAME).write_bytes(text.encode())
        return
    folder = out.local
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    shutil.copyfile(weights, staging / WEIGHTS_NAME)
    (staging / CONFIG_NAME).write_text(text)
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)


def _grid(card: dict[str, Any], corpus: Any) -> tuple[int, int, int]:
    """The training grid (nB, D, W): the card's single grid, else the corpus's most common raster grid."""
    from octssl.corpus.manifest import parse_grid

    grids = card.get("grid") or []
    if len(grids) == 1:
        return parse_grid(grids[0])
    counts: dict[str, int] = {}
    for row in corpus.rows:
        if row["raster"]:
            counts[row["grid"]] = counts.get(row["grid"], 0) + 1
    if not counts:
        raise ModelError(f"{corpus.path}: no raster volume to take the input grid from")
    return parse_grid(max(counts, key=lambda grid: counts[grid]))


def _val_threshold(model: Any, corpus: Any, task: str, depth: int) -> dict[str, Any]:
    """Threshold chosen on the val volumes labelled ``task``, with Dice and HD95 there."""
    import numpy as np

    from octssl.apply.predictor import Segmenter, choose_threshold, dice, hd95

    ids = corpus.ids(split=VAL, label=task)
    samples = [corpus.read(i) for i in ids]
    probs = Segmenter(model, depth=depth).probabilities([s["oct"] for s in samples],
                                                       [s["meta"]["spacing_mm"] for s in samples])
    truths = [s[task] for s in samples]
    threshold, pooled = choose_threshold(probs, truths)
    hd = [hd95(p >= threshold, t, s["meta"]["spacing_mm"]) for p, t, s in zip(probs, truths, samples, strict=True)]
    finite = [h for h in hd if np.isfinite(h)]
    mean_dice = float(np.mean([dice(p >= threshold, t) for p, t in zip(probs, truths, strict=True)])) if ids else None
    return {"threshold": threshold, "dice": mean_dice, "dice_pooled": None if not ids else pooled, "n": len(ids),
            "hd95_mm": float(np.mean(finite)) if finite else None, "hd95_undefined": len(hd) - len(finite)}


def write_sweep_bundles(sweep_dir: Path, summary: dict[str, Any], named: str | None = None) -> dict[str, str]:
    """One bundle per task of ``summary`` (the sweep's, before summary.json is written) for its best cell,
    under ``SWEEP_DIR/bundles/<task>``; a task whose bundle cannot be made is given as ``error: <reason>``
    (the sweep's results stand without it). ``named``: what provenance calls the sweep directory."""
    made = {}
    for task in summary["tasks"]:
        try:
            made[task] = str(export_model(sweep_dir, task, sweep_dir / "bundles" / task, overwrite=True,
                                          summary=summary, named=named))
        except ModelError as err:
            made[task] = f"error: {err}"
    return made
