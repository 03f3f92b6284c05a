"""The one training-data interface: what the train loop asks for batches, whatever the data sit in.

:func:`build_train_data` turns (job config, rank, world size) into a :class:`TrainData`: the batches of
an epoch from a given step (``batches(epoch, start_step)``), how many steps an epoch has, the volume grids,
and the data position (``state_dict``/``load_state_dict``) that a checkpoint saves for exact resume. Two
implementations sit behind it, chosen by ``data.source`` in one table (:data:`FEEDS`): a corpus read at
random (:class:`CorpusFeed`, over :class:`~octssl.data.sources.ZarrSource` and the epoch plan of
:mod:`octssl.data.plan`) and a stream of WebDataset tar shards (:class:`ShardFeed`, over
:class:`~octssl.data.sources.StreamSource`). Preflight builds the same object to check the data before
any worker starts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from octssl.config.job import JobConfig
from octssl.data import plan
from octssl.data.transforms import TrainTransform, collate
from octssl.data.version import corpus_version
from octssl.errors import ConfigError, ShardError
from octssl.vocab import SEGMENTATION, TRAIN, VOLUME
from octssl.webds.index import is_shard_dir

Batch = dict[str, Any]


class TrainData:
    """Batches for one rank, and the position in them. ``epoch``/``step`` advance as batches are consumed."""

    steps_per_epoch: int
    grids: list[str]  # volume grids "nBxDxW" of the training samples
    volumes: int  # training volumes (before crops per volume, ranks and batching)
    version: dict[str, Any]  # the corpus version read (octssl.data.version.corpus_version), for the run summary

    def __init__(self) -> None:
        self.epoch, self.step = 0, 0

    def epoch_batches(self, epoch: int, start_step: int) -> Iterator[Batch]:
        """The collated batches of ``epoch`` after its first ``start_step`` (implementations)."""
        raise NotImplementedError

    def batches(self, epoch: int, start_step: int) -> Iterator[Batch]:
        """The batches of ``epoch`` from ``start_step``; the position follows what the caller consumes."""
        self.epoch, self.step = epoch, start_step
        for batch in self.epoch_batches(epoch, start_step):
            self.step += 1  # counted before the caller sees it: a checkpoint now resumes after it
            yield batch

    def forever(self) -> Iterator[Batch]:
        """Endless batches from the current position, epoch after epoch."""
        while True:
            yield from self.batches(self.epoch, self.step)
            self.epoch, self.step = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, step = int(state["epoch"]), int(state["step"])
        if not 0 <= step <= self.steps_per_epoch:
            raise ConfigError(f"resume position step {step} is outside 0..{self.steps_per_epoch} of an epoch: "
                              "the data changed since the checkpoint")
        self.epoch, self.step = epoch, step

    def volume_shape(self) -> tuple[int, int, int]:
        """(nB, D, W) of the training volumes (one grid; ConfigError naming the grids when several)."""
        if len(self.grids) != 1:
            raise ConfigError(f"{self.where}: train samples on grids {self.grids}: train on one grid")
        nb, depth, w = (int(n) for n in self.grids[0].split("x"))
        return nb, depth, w

    where: str = "data"
    spacings: list[list[float]] = []  # spacing_mm (nB, D, W) of each training volume, where known
    key_fingerprint: str | None = None  # the pseudonym key's fingerprint the corpus records, where known
    patients: int | None = None  # training patients, where known
    devices: dict[str, int] = {}  # training volumes per device, where known

    def training_data(self) -> dict[str, Any]:
        """What the model learns from, for its card (and a bundle's model card)."""
        return {"volumes": self.volumes, "patients": self.patients, "devices": self.devices}

    def spacing_range(self) -> dict[str, list[float]] | None:
        """Per axis (nB, D, W) the smallest and largest spacing of the training volumes (None when unknown):
        what a bundle compares new inputs with."""
        if not self.spacings:
            return None
        values = np.asarray(self.spacings, float)
        return {"min": values.min(axis=0).tolist(), "max": values.max(axis=0).tolist()}


class CorpusFeed(TrainData):
    """Random access over a corpus: each epoch a seeded permutation dealt round-robin to ranks."""

    def __init__(self, source: Any, *, batch_size: int, seed: int, rank: int, world_size: int,
                 loader_workers: int) -> None:
        super().__init__()
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.rank, self.world_size, self.loader_workers = rank, world_size, loader_workers
        self.where = str(source.corpus_path)
        corpus = source.corpus
        self.grids = sorted(set(corpus.column("grid", source.ids)))
        self.spacings = [list(s) for s in corpus.column("spacing_mm", source.ids)]
        self.key_fingerprint = corpus.settings.get("key_fingerprint")
        self.patients = len(set(corpus.column("patient", source.ids)))
        self.devices = dict(Counter(corpus.column("device", source.ids)))
        self.volumes = len(source.ids)
        self.steps_per_epoch = plan.steps_per_epoch(len(source), world_size, batch_size)

    def epoch_batches(self, epoch: int, start_step: int) -> Iterator[Batch]:
        return plan.zarr_epoch(
            self.source, collate, batch_size=self.batch_size, seed=self.seed, epoch=epoch, start_step=start_step,
            rank=self.rank, world_size=self.world_size, loader_workers=self.loader_workers,
        )

    def volume_shape(self) -> tuple[int, int, int]:
        """(nB, D, W) of the first training volume (a corpus may hold several grids)."""
        nb, depth, w = (int(n) for n in self.source.corpus.row(self.source.ids[0])["grid"].split("x"))
        return nb, depth, w

    @classmethod
    def from_config(cls, c: JobConfig, rank: int, world_size: int) -> CorpusFeed:
        from octssl.data.sources import ZarrSource

        target = c.objective.target
        segmentation = c.objective.kind == SEGMENTATION
        source = ZarrSource(
            c.data.corpus, split=TRAIN, label=target if segmentation else None,
            label_fraction=c.objective.label_fraction if segmentation else None,
            require=(VOLUME, target), transform=train_transform(c), repeats=c.data.crops_per_volume,
        )
        if not source.ids:
            what = f"labelled '{target}'" if segmentation else f"'{target}'"
            raise ConfigError(f"{c.data.corpus}: no train volumes with {what}: nothing to train on")
        feed = cls(source, batch_size=c.data.batch_size, seed=c.run.seed, rank=rank, world_size=world_size,
                   loader_workers=c.data.loader_workers)
        feed.version = corpus_version(c.data.corpus)
        return feed


class ShardFeed(TrainData):
    """A stream of tar shards: equal batches per rank, each epoch's order a pure function of the seed."""

    def __init__(self, stream: Any, *, loader_workers: int, target: str) -> None:
        super().__init__()
        self.stream, self.loader_workers = stream, loader_workers
        self.where = f"{stream.shards_dir}/index.json"
        entries = [e for e in stream.entries.values() if e.get("split") == TRAIN and target in e["sha256"]]
        if not entries:
            raise ConfigError(f"{self.where}: no train samples with '{target}': nothing to train on")
        self.grids = sorted({str(e.get("grid")) for e in entries})
        self.volumes = len(entries)
        self.steps_per_epoch = stream.batches_per_epoch

    def epoch_batches(self, epoch: int, start_step: int) -> Iterator[Batch]:
        self.stream.load_state_dict({"epoch": epoch, "step": start_step})
        return iter(self.stream.loader(num_workers=self.loader_workers, collate_fn=collate))

    @classmethod
    def from_config(cls, c: JobConfig, rank: int, world_size: int) -> ShardFeed:
        from octssl.data.sources import StreamSource

        if c.data.shards is None or not is_shard_dir(c.data.shards):
            raise ConfigError(f"data.shards={c.data.shards}: no index.json (run `octssl export-shards` first)")
        try:
            stream = StreamSource(c.data.shards, split=TRAIN, rank=rank, world_size=world_size, seed=c.run.seed,
                                  batch_size=c.data.batch_size, transform=train_transform(c), prefetch=c.data.prefetch)
        except ShardError as err:
            raise ConfigError(str(err)) from None
        feed = cls(stream, loader_workers=c.data.loader_workers, target=c.objective.target)
        feed.version = corpus_version(c.data.corpus, c.data.shards)
        return feed


def train_transform(c: JobConfig) -> TrainTransform:
    """Random crops (and flips, rotations, intensity when ``data.augment``) of the objective's target."""
    augment = c.data.augment
    return TrainTransform(crop=tuple(c.data.crop), targets=(c.objective.target,), seed=c.run.seed,
                          flips=augment, rot180=augment, intensity=augment)


#: ``data.source`` -> how to build its feed; the only place the two sources are told apart
FEEDS: dict[str, Callable[[JobConfig, int, int], TrainData]] = {
    "zarr": CorpusFeed.from_config,
    "stream": ShardFeed.from_config,
}


def build_train_data(config: JobConfig, rank: int = 0, world_size: int = 1) -> TrainData:
    """The training data of ``config`` for ``rank`` of ``world_size``; ConfigError when there is none."""
    return FEEDS[config.data.source](config, rank, world_size)
