"""TensorBoard event files of a run: rank 0 writes scalars and en-face reconstructions to RUN_DIR/tensorboard.

Open them with ``tensorboard --logdir RUN_DIR/tensorboard`` (or a folder of runs). Scalars are tagged
``train/<name>`` and ``val/<name>``; during pretraining every evaluation adds ``reconstruction/<volume>``
images: the target en-face image on top, the model's reconstruction below. A resumed run writes a new
event file whose first step purges the older file's events from that step on (TensorBoard's
``purge_step``), so replayed steps are not shown twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from octssl.data.transforms import collate
from octssl.vocab import RECONSTRUCTION, VOLUME

BOARD_DIR = "tensorboard"
IMAGE_VOLUMES = 2  # val volumes shown as reconstructions at each evaluation


class Board:
    """The run's event writer; a no-op unless ``enabled`` (rank 0). The writer opens at the first record."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.path = run_dir / BOARD_DIR
        self.enabled = enabled
        self._writer: Any = None

    def _open(self, step: int) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.path), purge_step=step)
        return self._writer

    def scalars(self, step: int, prefix: str, values: Mapping[str, float | None]) -> None:
        """Write ``prefix/name`` for every value that is a number (None is skipped), then flush."""
        if not self.enabled:
            return
        writer = self._open(step)
        for name, value in values.items():
            if value is not None:
                writer.add_scalar(f"{prefix}/{name}", float(value), step)
        writer.flush()

    def images(self, step: int, pairs: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
        """Write one image per (volume id, target, reconstruction): both ``(nB, W)`` in [0, 1], stacked."""
        if not self.enabled or not pairs:
            return
        writer = self._open(step)
        for volume, target, prediction in pairs:
            writer.add_image(f"reconstruction/{volume}", np.concatenate([target, prediction])[None], step,
                             dataformats="CHW")
        writer.flush()


@torch.no_grad()
def reconstructions(trainer: Any, n: int = IMAGE_VOLUMES) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(id, target, sigmoid(logits)) of the first ``n`` val volumes. Every rank must call it (the forward
    is collective under ZeRO-3); an objective other than reconstruction, or no val split, gives []."""
    objective, source = trainer.objective, trainer.val_source
    if objective.kind != RECONSTRUCTION or source is None or len(source) == 0:
        return []
    trainer.engine.eval()
    pairs = []
    for i in range(min(n, len(source))):
        batch = trainer.to_device(collate([source[i]]))
        logits = trainer.predictor.logits(batch[VOLUME])  # the forward of validation and `octssl predict`
        target = objective.target_tensor(logits, batch)
        pairs.append((str(batch["id"][0]), target[0, 0].cpu().numpy(), torch.sigmoid(logits)[0, 0].cpu().numpy()))
    trainer.engine.train()
    return pairs
