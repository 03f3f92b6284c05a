"""Batches for the train loop: a deterministic, resumable epoch plan over either source.

Random-access corpora (ZarrSource with ``repeats`` = crops per volume): each epoch's order is a pure
function of (seed, epoch); it is dealt to ranks round-robin and padded by wrapping so that every rank
runs the same number of steps (no rank waits in an all-reduce at epoch end). A sample's augmentation
is seeded by (seed, epoch, draw index, id) in the transform, so a run resumed from (epoch, step) sees
exactly the crops that the uninterrupted run would have seen. Streams (StreamSource) carry the same
guarantees themselves.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset


def epoch_indices(n: int, *, seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    """This rank's source indices for ``epoch``: the same count on every rank."""
    if n < 1:
        raise ValueError("no training samples")
    order = np.random.default_rng([seed, epoch]).permutation(n)
    per_rank = -(-n // world_size)  # ceil: pad by wrapping around
    return [int(order[(rank + world_size * i) % n]) for i in range(per_rank)]


def steps_per_epoch(n: int, world_size: int, batch_size: int) -> int:
    return max(1, -(-n // world_size) // batch_size)


def zarr_epoch(
    source: Any,
    collate: Any,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    start_step: int,
    rank: int,
    world_size: int,
    loader_workers: int,
) -> Iterator[dict[str, Any]]:
    """The batches of one epoch after the first ``start_step`` (for resume)."""
    indices = epoch_indices(len(source), seed=seed, epoch=epoch, rank=rank, world_size=world_size)
    n_steps = steps_per_epoch(len(source), world_size, batch_size)
    indices = (indices * batch_size)[: n_steps * batch_size][start_step * batch_size :]
    if not indices:
        return iter(())
    source.set_epoch(epoch)  # before the loader forks its workers
    loader = DataLoader(
        Subset(source, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=loader_workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )
    return iter(loader)
