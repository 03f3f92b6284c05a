"""Model bundles: a fine-tuned segmentation model ready to run on new scans, as two plain files.

``BUNDLE/model.safetensors`` (the weights, never pickle) and ``BUNDLE/config.json``: ``format``,
``octssl_version``, ``task``, ``model`` (registry name and build options, width included), ``input``
(normalisation, the en-face size multiple, the training ``grid`` nB x D x W and ``depth_mm`` window that
device files are put on), ``threshold`` (the probability threshold with the best pooled Dice on the val
split, over 0.05..0.95) with ``threshold_source``, ``metrics`` (``val`` at that threshold; ``test`` from
the sweep when the bundle comes from one) and ``provenance`` (run directory, sweep and trial, corpus path
and the sha256 of its manifest, the training config, the weights' sha256, creation time).

:func:`export_model` makes one from a fine-tuning run directory or from a sweep directory (the cell of
``task`` whose chosen trial has the best val Dice); :func:`load_bundle` checks everything before it builds
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
from octssl.errors import ModelError
from octssl.storage import Location
from octssl.vocab import MASKS, SEGMENTATION, VAL

FORMAT = "octssl-bundle/1"
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
MULTIPLE = 16


@dataclass
class Bundle:
    """A loaded bundle: the model (eval mode, CPU) and its config."""

    path: Path
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


def load_bundle(path: str | Path) -> Bundle:
    """The bundle at ``path`` with its model built and loaded; ModelError naming the bundle when refused."""
    from octssl.models.registry import build_model
    from octssl.models.transfer import MODEL_KEY, OPTIONS_KEY, load_weights, read_metadata

    path = Path(path)
    config_path, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_path.is_file() or not weights.is_file():
        raise ModelError(f"{path}: not a model bundle (needs {CONFIG_NAME} and {WEIGHTS_NAME}; make one with "
                         "`octssl export-model`)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelError(f"{config_path}: format {config.get('format') if isinstance(config, dict) else None!r} "
                         f"is not {FORMAT!r}")
    if config.get("octssl_version") != __version__:
        raise ModelError(f"{path}: bundle made by octssl {config.get('octssl_version')}, this is octssl "
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
        raise ModelError(f"{path}: bundle refused: " + "; ".join(problems))
    model = build_model(model_config["name"], **model_config["options"])
    load_weights(model, weights, scope="all")
    return Bundle(path=path, config=config, model=model.eval())


# ---------------------------------------------------------------- export
def _run_of(source: Path, task: str, summary: dict[str, Any] | None) -> tuple[Path, dict[str, Any]]:
    """The fine-tuning run to bundle and what is known about it (sweep, trial, test metrics)."""
    summary_path = source / "summary.json"
    if summary is None and summary_path.is_file() and (source / "trials").is_dir():  # a sweep directory
        summary = json.loads(summary_path.read_text())
    if summary is not None:
        cells = [c for c in summary.get("cells", []) if c.get("task") == task and c.get("best_config")]
        if not cells:
            raise ModelError(f"{source}: the sweep has no finished cell for task {task!r}")
        cell = max(cells, key=lambda c: c["best_config"]["val_dice_pooled"])
        trial = cell["best_config"]["trial"]
        test = {"dice": cell.get("dice_mean"), "hd95_mm": cell.get("hd95_mean"), "n": cell.get("n_test"),
                "seeds": cell.get("n_seeds")}
        extra = {"sweep": str(source), "trial": trial,
                 "cell": {k: cell[k] for k in ("task", "fraction", "init", "model")}}
        return source / "trials" / trial, {"test": test, "provenance": extra}
    return source, {"test": None, "provenance": {}}


def _weights_of(run_dir: Path) -> Path:
    for name in ("best", "final"):
        if (run_dir / name / WEIGHTS_NAME).is_file():
            return run_dir / name / WEIGHTS_NAME
    raise ModelError(f"{run_dir}: no best/ or final/ {WEIGHTS_NAME}: not a finished fine-tuning run (or a sweep "
                     "directory with summary.json)")


def export_model(source: str | Path, task: str, out: str | Path, *, overwrite: bool = False,
                 summary: dict[str, Any] | None = None) -> Path:
    """Write a bundle for ``task`` from a fine-tuning run directory or a sweep directory; returns ``out``.
    ``summary``: the sweep's summary when it is not on disk yet (the sweep itself, at its end)."""
    from octssl.config import load_config
    from octssl.corpus.store import Corpus
    from octssl.models.transfer import model_from_weights, read_metadata

    source, out = Path(source), Path(out)
    if task not in MASKS:
        raise ModelError(f"--task {task!r}: bundles are for segmentation tasks {MASKS}")
    if not source.is_dir():
        raise ModelError(f"{source}: no such run or sweep directory")
    if (out / CONFIG_NAME).exists() and not overwrite:
        raise ModelError(f"{out}: a bundle is already there (pass --overwrite to replace it)")
    run_dir, known = _run_of(source, task, summary)
    weights = _weights_of(run_dir)
    job = load_config(run_dir / "config.yaml")
    objective = job.objective
    if objective.kind != SEGMENTATION or objective.target != task:
        raise ModelError(f"{run_dir}: the run trained {objective.kind} of {objective.target!r}, not segmentation "
                         f"of {task!r}")
    corpus_path = Path(job.data.corpus or "")
    try:
        corpus = Corpus.open(corpus_path)
    except Exception as err:  # noqa: BLE001 - any reason the corpus cannot be read is reported the same way
        raise ModelError(f"{run_dir}: the training corpus {corpus_path} cannot be opened to choose the threshold "
                         f"on its val split ({err})") from None
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
            "run_dir": str(run_dir.resolve()), **known["provenance"], "weights_sha256": _sha256(weights),
            "corpus": str(corpus_path.resolve()), "corpus_manifest_sha256": hashlib.sha256(Location.parse(corpus.manifest_path).read_bytes()).hexdigest(),
            "training_config": yaml.safe_load((run_dir / "config.yaml").read_text()),
            "created": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    shutil.copyfile(weights, staging / WEIGHTS_NAME)
    (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


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

    from octssl.inference import Segmenter, choose_threshold, dice, hd95

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


def write_sweep_bundles(sweep_dir: Path, summary: dict[str, Any]) -> dict[str, str]:
    """One bundle per task of ``summary`` (the sweep's, before summary.json is written) for its best cell,
    under ``SWEEP_DIR/bundles/<task>``; a task whose bundle cannot be made is given as ``error: <reason>``
    (the sweep's results stand without it)."""
    made = {}
    for task in summary["tasks"]:
        try:
            made[task] = str(export_model(sweep_dir, task, sweep_dir / "bundles" / task, overwrite=True,
                                          summary=summary))
        except ModelError as err:
            made[task] = f"error: {err}"
    return made
