"""Test-split evaluation of chosen weights, and the en-face arrays behind the report's figures.

Plain functions of (corpus, weights, ids): the sweep runs them as Ray tasks with a trial's resources,
tests call them directly. Volumes go through :class:`~octssl.apply.predictor.Predictor` (as in validation
and ``octssl predict``) and are scored by :mod:`octssl.apply.metrics` at the threshold the trial chose on val.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from octssl.corpus.store import Corpus
from octssl.errors import ModelError
from octssl.vocab import DICE, FAF, HD95, OVERLAP_PX, PRED_PX, RECONSTRUCTION, TRUTH_PX, VOLUME


def mean_projection(volume: np.ndarray) -> np.ndarray:
    """The en-face mean over depth of a uint8 (nB, D, W) volume, as float32 in [0, 1]."""
    return (np.asarray(volume, np.float32).mean(axis=1) / 255.0).astype(np.float32)


@torch.no_grad()
def evaluate_segmentation(corpus_path: str, weights: str, task: str, ids: list[str], *, threshold: float = 0.5,
                          show: Sequence[str] = (), threads: int = 1,
                          gpu: bool = False) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Per-volume ``{id, dice, hd95_mm, truth_px, pred_px, overlap_px}`` of ``weights`` on ``ids`` at
    ``threshold`` (the probability its trial chose on the val split; pixel counts of the mask and of the
    prediction tell healthy eyes from lesions); plus, for the volumes in ``show``,
    ``ids`` and en-face arrays ``enface`` (mean projection), ``truth`` and ``prob`` (sigmoid), ``(n, nB, W)``."""
    from octssl.apply.metrics import volume_rows
    from octssl.apply.predictor import Predictor
    from octssl.models.transfer import model_from_weights

    torch.set_num_threads(max(1, threads))
    corpus = Corpus.open(corpus_path)
    predictor = Predictor.for_model(model_from_weights(weights), gpu=gpu)
    rows: list[dict[str, Any]] = []
    preview: dict[str, list[Any]] = {"ids": [], "enface": [], "truth": [], "prob": []}
    for sample_id in ids:
        sample = corpus.read(sample_id)
        if task not in sample:
            raise ModelError(f"{corpus_path}: test sample {sample_id} has no '{task}' mask")
        spacing = sample["meta"]["spacing_mm"]
        (prob,) = predictor.probabilities([sample[VOLUME]], [spacing])
        truth = torch.from_numpy(np.asarray(sample[task]) > 0)[None, None]
        (row,) = volume_rows(torch.from_numpy(prob)[None, None], truth,
                             torch.tensor([[spacing[0], spacing[2]]], dtype=torch.float64), [sample_id], threshold)
        rows.append({"id": sample_id, DICE: float(row[DICE]), HD95: float(row[HD95]),
                     TRUTH_PX: int(row[TRUTH_PX]), PRED_PX: int(row[PRED_PX]), OVERLAP_PX: int(row[OVERLAP_PX])})
        if sample_id in show:
            preview["ids"].append(sample_id)
            preview["enface"].append(mean_projection(sample["oct"]))
            preview["truth"].append(np.asarray(sample[task], np.uint8))
            preview["prob"].append(prob)
    return rows, {k: np.stack(v) if k != "ids" else np.array(v) for k, v in preview.items() if v}


def figure_ids(corpus_path: str, task: str, ids: list[str], count: int) -> list[str]:
    """Up to ``count`` of ``ids`` to draw: volumes showing the lesion first, one per patient while possible."""

    corpus = Corpus.open(corpus_path)
    area = {i: int(np.count_nonzero(corpus.read_array(task, corpus.row(i)))) for i in ids}
    patient = {i: corpus.row(i)["patient"] for i in ids}
    ranked = sorted(ids, key=lambda i: area[i] == 0)  # stable: manifest order within each group
    chosen: list[str] = []
    for distinct in (True, False):
        for i in ranked:
            if len(chosen) < count and i not in chosen and not (distinct and patient[i] in {patient[c] for c in chosen}):
                chosen.append(i)
    return chosen


@torch.no_grad()
def reconstruct(corpus_path: str, weights: str, ids: list[str], *, threads: int = 1,
                gpu: bool = False) -> dict[str, np.ndarray]:
    """What a pretrained (reconstruction) checkpoint makes of ``ids``: ``enface`` (mean projection),
    ``target`` (the modality as the objective sees it: FAF inverted) and ``output``, each ``(n, nB, W)``."""
    from octssl.apply.predictor import Predictor, on_grid
    from octssl.data.transforms import EvalTransform, collate
    from octssl.models.transfer import model_from_weights, read_metadata

    torch.set_num_threads(max(1, threads))
    card = read_metadata(weights).get("card") or {}
    objective = card.get("objective") or {}
    if objective.get("kind") != RECONSTRUCTION:
        raise ModelError(f"{weights}: not a reconstruction (pretraining) checkpoint: objective {objective}")
    target = objective["target"]
    corpus = Corpus.open(corpus_path)
    predictor = Predictor.for_model(model_from_weights(weights), gpu=gpu)
    transform = EvalTransform(targets=(target,))
    out: dict[str, list[np.ndarray]] = {"enface": [], "target": [], "output": []}
    for sample_id in ids:
        sample = corpus.read(sample_id)
        batch = collate([transform(sample)])
        logits = predictor.logits(batch[VOLUME]).cpu()
        shape = sample[target].shape
        unit = sample[target].astype(np.float32) / 255.0
        out["enface"].append(mean_projection(sample[VOLUME]))
        out["target"].append(1.0 - unit if target == FAF else unit)
        out["output"].append(torch.sigmoid(on_grid(logits, shape))[0, 0].numpy().astype(np.float32))
    return {k: np.stack(v).astype(np.float32) for k, v in out.items()} | {"modality": np.array(target)}
