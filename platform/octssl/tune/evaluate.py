"""Test-split evaluation of chosen weights, and the en-face arrays behind the report's figures.

Plain functions of (corpus, weights, ids): the sweep runs them as Ray tasks with a trial's resources,
tests call them directly. Volumes go through the same ``EvalTransform`` + ``collate`` as validation in
the train loop, and the metrics come from the segmentation objective (Dice at 0.5, HD95 in mm).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from octssl.errors import ModelError
from octssl.vocab import DICE, FAF, HD95, OVERLAP_PX, PRED_PX, RECONSTRUCTION, SEGMENTATION, TRUTH_PX, VOLUME


def _device(gpu: bool) -> torch.device:
    return torch.device("cuda") if gpu and torch.cuda.is_available() else torch.device("cpu")


def _load(weights: str, device: torch.device) -> torch.nn.Module:
    from octssl.models.transfer import model_from_weights

    return model_from_weights(weights).to(device).eval()


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
    from octssl.corpus.store import Corpus
    from octssl.data.transforms import EvalTransform, collate
    from octssl.train.objectives import build_objective, score_batch

    torch.set_num_threads(max(1, threads))
    device = _device(gpu)
    corpus = Corpus.open(corpus_path)
    model = _load(weights, device)
    objective = build_objective(SEGMENTATION, target=task)
    transform = EvalTransform(targets=(task,))
    rows: list[dict[str, Any]] = []
    preview: dict[str, list[Any]] = {"ids": [], "enface": [], "truth": [], "prob": []}
    for sample_id in ids:
        sample = corpus.read(sample_id)
        if task not in sample:
            raise ModelError(f"{corpus_path}: test sample {sample_id} has no '{task}' mask")
        batch = collate([transform(sample)])
        batch[VOLUME] = batch[VOLUME].to(device)
        logits, (row,) = score_batch(model, objective, batch, threshold)
        logits = logits.cpu()
        rows.append({"id": sample_id, DICE: float(row[DICE]), HD95: float(row[HD95]),
                     TRUTH_PX: int(row[TRUTH_PX]), PRED_PX: int(row[PRED_PX]), OVERLAP_PX: int(row[OVERLAP_PX])})
        if sample_id in show:
            preview["ids"].append(sample_id)
            preview["enface"].append(mean_projection(sample["oct"]))
            preview["truth"].append(np.asarray(sample[task], np.uint8))
            prob = torch.sigmoid(logits)[0, 0]
            preview["prob"].append(_resize(prob, sample[task].shape))
    return rows, {k: np.stack(v) if k != "ids" else np.array(v) for k, v in preview.items() if v}


def figure_ids(corpus_path: str, task: str, ids: list[str], count: int) -> list[str]:
    """Up to ``count`` of ``ids`` to draw: volumes showing the lesion first, one per patient while possible."""
    from octssl.corpus.store import Corpus

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
    from octssl.corpus.store import Corpus
    from octssl.data.transforms import EvalTransform, collate
    from octssl.models.transfer import read_metadata

    torch.set_num_threads(max(1, threads))
    card = read_metadata(weights).get("card") or {}
    objective = card.get("objective") or {}
    if objective.get("kind") != RECONSTRUCTION:
        raise ModelError(f"{weights}: not a reconstruction (pretraining) checkpoint: objective {objective}")
    target = objective["target"]
    device = _device(gpu)
    corpus = Corpus.open(corpus_path)
    model = _load(weights, device)
    transform = EvalTransform(targets=(target,))
    out: dict[str, list[np.ndarray]] = {"enface": [], "target": [], "output": []}
    for sample_id in ids:
        sample = corpus.read(sample_id)
        batch = collate([transform(sample)])
        image = torch.sigmoid(model(batch[VOLUME].to(device)).float().cpu())[0, 0]
        shape = sample[target].shape
        unit = sample[target].astype(np.float32) / 255.0
        out["enface"].append(mean_projection(sample[VOLUME]))
        out["target"].append(1.0 - unit if target == FAF else unit)
        out["output"].append(_resize(image, shape))
    return {k: np.stack(v).astype(np.float32) for k, v in out.items()} | {"modality": np.array(target)}


def _resize(image: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """An en-face map back on the volume's own grid (EvalTransform may have resized it)."""
    if tuple(image.shape) != tuple(shape):
        image = torch.nn.functional.interpolate(image[None, None], size=tuple(shape), mode="bilinear",
                                                align_corners=False)[0, 0]
    return image.numpy().astype(np.float32)
