"""Batches for the train loop: a deterministic, resumable epoch plan over either source.

The plan for random-access corpora (ZarrSource): each epoch draws ``crops_per_volume`` random crops of
every training volume, in an order that is a pure function of (seed, epoch); the draws are dealt to
ranks round-robin and padded by wrapping so that every rank runs the same number of steps (no rank
waits in an all-reduce at epoch end). A draw carries its own augmentation seed, so a run resumed
from (epoch, step) sees exactly the crops that the uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


@dataclass(frozen=True)
class Draw:
    index: int  # position of the volume in the source
    seed: int  # augmentation seed of this crop


def epoch_draws(
    n_volumes: int, crops_per_volume: int, *, seed: int, epoch: int, rank: int, world_size: int
) -> list[Draw]:
    """This rank's draws for ``epoch``: equal length on every rank."""
    if n_volumes < 1:
        raise ValueError("no training volumes")
    rng = np.random.default_rng([seed, epoch])
    order = np.tile(np.arange(n_volumes), crops_per_volume)
    rng.shuffle(order)
    seeds = rng.integers(0, 2**31 - 1, size=order.size)
    per_rank = -(-order.size // world_size)  # ceil: pad by wrapping around
    picks = [(rank + world_size * i) % order.size for i in range(per_rank)]
    return [Draw(int(order[p]), int(seeds[p])) for p in picks]


def steps_per_epoch(n_volumes: int, crops_per_volume: int, world_size: int, batch_size: int) -> int:
    per_rank = -(-(n_volumes * crops_per_volume) // world_size)
    return max(1, per_rank // batch_size)


class DrawDataset(Dataset):
    """Applies a seeded transform to the source's samples in the order of ``draws``."""

    def __init__(self, source: Any, draws: list[Draw], transform: Any) -> None:
        self.source, self.draws, self.transform = source, draws, transform

    def __len__(self) -> int:
        return len(self.draws)

    def __getitem__(self, i: int) -> dict[str, Any]:
        draw = self.draws[i]
        sample = self.source[draw.index]
        return self.transform(sample, rng=np.random.default_rng(draw.seed))


def zarr_batches(
    source: Any,
    transform: Any,
    collate: Any,
    *,
    batch_size: int,
    crops_per_volume: int,
    seed: int,
    epoch: int,
    start_step: int,
    rank: int,
    world_size: int,
    loader_workers: int,
) -> Iterator[dict[str, Any]]:
    """Batches of one epoch, starting after ``start_step`` batches (for resume)."""
    draws = epoch_draws(len(source), crops_per_volume, seed=seed, epoch=epoch, rank=rank, world_size=world_size)
    n_steps = len(draws) // batch_size if len(draws) >= batch_size else 1
    draws = (draws * batch_size)[: n_steps * batch_size][start_step * batch_size :]
    if not draws:
        return iter(())
    loader = DataLoader(
        DrawDataset(source, draws, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=loader_workers,
        collate_fn=collate,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
    )
    return iter(loader)
