"""ZarrSource and StreamSource: the one sample dict from a corpus or its shards, split by rank and worker.

ZarrSource is a map-style Dataset over ``Corpus.ids(...)`` (random access for fine-tuning and evaluation).
StreamSource is an IterableDataset over the tar shards written by ``octssl.webds.export``.

How StreamSource orders an epoch, and why it does not use ``webdataset.WebDataset``:
an epoch is a pure function of (seed, epoch, rank, world_size). The shard order is permuted with
``rng(seed, epoch)``; the samples of that order form one global sequence; rank ``r`` takes the contiguous
slice ``[r*N/world, (r+1)*N/world)`` (a run of whole shards plus at most two partial ones, so ranks read
disjoint data and their lengths differ by at most one); that slice is shuffled within windows of
``shuffle_window`` samples with ``rng(seed, epoch, rank)`` (the shuffle-buffer effect without holding
samples in memory), then cut or padded (by cycling the slice, reshuffled per cycle) to exactly
``batches_per_epoch * batch_size`` samples, so every rank yields the same number of batches and no
rank waits at an epoch's end. Batch ``b`` is read by loader worker ``(b - step) mod num_workers``, each
worker yielding whole batches in order; the DataLoader collects workers round-robin, so the batch order
is the same for any number of workers, and resuming at (epoch, step) yields exactly the batches the
uninterrupted run would have yielded from that step. A WebDataset pipeline (shard-level node and worker
splitting plus a stateful shuffle buffer) cannot give that: its per-worker shard lists make per-rank
counts unequal and its buffer state is lost at a restart. The index stores every sample's byte range,
so a worker reads a sample with one seek and one read; every decoded array is checked against the
corpus manifest's sha256. The shards remain ordinary WebDataset tars for any other reader.

Shards on an object store (``s3://bucket/shards``, see ``octssl.storage.location``) are read the same way: one
range request per sample, the next ``prefetch`` samples of the worker fetched ahead by a few threads
(on local disk the kernel is asked to read ahead instead), each request with bounded timeouts and
retries with backoff; a failed read raises ShardError naming the shard URL and the sample.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from octssl.corpus.region import read_crop
from octssl.corpus.store import Corpus
from octssl.data.transforms import collate
from octssl.errors import ShardError, StorageError
from octssl.sample import VOLUME_KEY
from octssl.storage.location import Location
from octssl.webds.index import load_index, shard_meta
from octssl.webds.read import read_sample, sample_from_bytes

Transform = Callable[[dict[str, Any]], dict[str, Any]]


def _with_draw(sample: dict[str, Any], epoch: int, draw: int) -> dict[str, Any]:
    """Tag a sample with its (epoch, draw) so transforms seed their randomness reproducibly."""
    meta = sample.get("meta") or {}
    sample["meta"] = {**shard_meta(meta), "epoch": int(epoch), "draw": int(draw)}
    if "region" in meta:  # a crop read: where the crop lies in the volume (the transform needs it)
        sample["meta"]["region"] = meta["region"]
    return sample


class ZarrSource(Dataset):
    """Random access over a corpus: ``source[i]`` is sample ``ids[i % len(ids)]`` after ``transform``.

    ``repeats`` > 1 visits each volume that many times per epoch (the paper draws 20 random crops per
    scan per epoch); each visit has its own draw number, hence its own augmentation. The corpus handle
    is reopened lazily in each loader worker.
    """

    def __init__(
        self,
        corpus: Any,
        split: str | None = "train",
        label: str | None = None,
        label_fraction: float | None = None,
        require: Sequence[str] = (VOLUME_KEY,),
        transform: Transform | None = None,
        *,
        raster_only: bool = True,
        repeats: int = 1,
        epoch: int = 0,
        verify: bool = False,
    ) -> None:

        self._corpus = corpus if isinstance(corpus, Corpus) else Corpus.open(corpus)
        self.corpus_path = self._corpus.path  # a Path, or a Location for a published corpus
        self.ids = self._corpus.ids(split=split, label=label, label_fraction=label_fraction, require=require,
                                    raster_only=raster_only)
        self.transform, self.repeats, self.epoch, self.verify = transform, int(repeats), int(epoch), verify

    @property
    def corpus(self) -> Any:
        if self._corpus is None:
            self._corpus = Corpus.open(self.corpus_path)
        return self._corpus

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_corpus": None}

    def __len__(self) -> int:
        return len(self.ids) * self.repeats

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.corpus_path}: index {index} outside 0..{len(self) - 1}")
        return self._load(self.ids[index % len(self.ids)], index)

    def _load(self, sample_id: str, draw: int) -> dict[str, Any]:
        window = getattr(self.transform, "window", None)
        if window is not None and not self.verify:  # a crop known before the read: read only its region
            bscans, ascans = window(sample_id, self.corpus.row(sample_id)["shape"], self.epoch, draw)
            sample = read_crop(self.corpus, sample_id, bscans, ascans)
        else:  # a checksum covers the whole volume: verify reads it whole
            sample = self.corpus.read(sample_id, verify=self.verify)
        sample = _with_draw(sample, self.epoch, draw)
        return self.transform(sample) if self.transform else sample


class StreamSource(IterableDataset):
    """Sequential samples from tar shards; equal batches per rank; exact resume from (epoch, step).

    Iterate it through ``source.loader(num_workers=...)``, which builds the DataLoader with the
    source's batch size and advances ``state_dict()`` as batches are consumed. Iterating the source
    itself yields the samples of epoch ``self.epoch`` from batch ``self.step`` and changes no state.
    """

    def __init__(
        self,
        shards_dir: str | Path | Location,
        split: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epoch: int = 0,
        batches_per_epoch: int | None = None,
        batch_size: int = 1,
        transform: Transform | None = None,
        *,
        shuffle_window: int = 64,
        verify: bool = True,
        open_files: int = 4,
        prefetch: int = 4,
    ) -> None:
        super().__init__()
        self.shards_dir = Location.parse(shards_dir)
        if not 0 <= rank < world_size:
            raise ShardError(f"{self.shards_dir}: rank {rank} outside world of size {world_size}")
        if batch_size < 1:
            raise ShardError(f"{self.shards_dir}: batch_size must be >= 1, got {batch_size}")
        index = load_index(self.shards_dir)
        self.entries: dict[str, dict[str, Any]] = index["samples"]
        self.shards: list[list[str]] = []  # per shard (in index order): its ids of the chosen split
        for shard in index["shards"]:
            ids = [sid for sid in shard["ids"] if split is None or self.entries[sid]["split"] == split]
            if ids:
                self.shards.append(ids)
        self.shard_bytes = {shard["name"]: shard["bytes"] for shard in index["shards"]}
        self.total = sum(len(ids) for ids in self.shards)
        self.split, self.rank, self.world_size, self.seed = split, rank, world_size, int(seed)
        self.batch_size, self.transform = batch_size, transform
        self.shuffle_window, self.verify, self.open_files = max(1, shuffle_window), verify, max(1, open_files)
        self.prefetch = max(0, prefetch)  # samples read ahead: fetched by threads (object store) or fadvised
        default = self.total // (world_size * batch_size)
        self.batches_per_epoch = default if batches_per_epoch is None else int(batches_per_epoch)
        if self.batches_per_epoch < 1:
            raise ShardError(f"{self.shards_dir}: {self.total} samples (split={split!r}) cannot fill one batch "
                             f"of {batch_size} on each of {world_size} ranks")
        self.epoch, self.step = int(epoch), 0

    # ---- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """The data position: ``epoch`` and ``step`` (batches of this epoch already consumed)."""
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        step = int(state["step"])
        if not 0 <= step <= self.batches_per_epoch:
            raise ShardError(f"{self.shards_dir}: resume step {step} outside 0..{self.batches_per_epoch}")
        self.epoch, self.step = int(state["epoch"]), step

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.step = int(epoch), 0

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    # ---- the epoch plan -----------------------------------------------------------------------
    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    def epoch_order(self, epoch: int) -> list[str]:
        """This rank's samples for ``epoch``, in yield order: exactly ``batches_per_epoch * batch_size`` ids."""
        order = self._rng(epoch).permutation(len(self.shards))
        sequence = [sid for shard in order for sid in self.shards[shard]]
        begin = self.rank * self.total // self.world_size
        mine = sequence[begin:(self.rank + 1) * self.total // self.world_size]
        if not mine:  # more ranks than samples: borrow a neighbour's sample rather than hang
            mine = [sequence[self.rank % len(sequence)]]
        wanted = self.batches_per_epoch * self.batch_size
        out: list[str] = []
        cycle = 0
        while len(out) < wanted:
            rng = self._rng(epoch, self.rank, cycle)
            for start in range(0, len(mine), self.shuffle_window):
                window = mine[start:start + self.shuffle_window]
                out += [window[i] for i in rng.permutation(len(window))]
            cycle += 1
        return out[:wanted]

    # ---- iteration ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = self.epoch_order(self.epoch)
        draws = [draw for batch in range(self.step + worker, self.batches_per_epoch, workers)
                 for draw in range(batch * self.batch_size, (batch + 1) * self.batch_size)]
        if self.shards_dir.remote:
            yield from self._iter_remote(order, draws)
            return
        files: OrderedDict[str, BinaryIO] = OrderedDict()
        try:
            for position, draw in enumerate(draws):
                if self.prefetch:
                    for ahead in draws[position + (self.prefetch if position else 1):position + self.prefetch + 1]:
                        self._prefetch(order[ahead], files)
                sample = _with_draw(self._read(order[draw], files), self.epoch, draw)
                yield self.transform(sample) if self.transform else sample
        finally:
            for handle in files.values():
                handle.close()

    def _iter_remote(self, order: list[str], draws: list[int]) -> Iterator[dict[str, Any]]:
        """The samples of ``draws`` from an object store: range reads started ``prefetch`` samples ahead."""
        files: dict[str, Any] = {}
        pending: dict[int, Future[bytes]] = {}
        pool = ThreadPoolExecutor(max(1, min(self.prefetch, 8)), thread_name_prefix="octssl-prefetch")
        try:
            for position, draw in enumerate(draws):
                for ahead in range(position, min(position + self.prefetch + 1, len(draws))):
                    if ahead not in pending:
                        sid = order[draws[ahead]]
                        pending[ahead] = pool.submit(self._fetch, sid, self._remote_handle(sid, files))
                sid = order[draw]
                sample = sample_from_bytes(pending.pop(position).result(), self.entries[sid], sid,
                                           str(self.shards_dir / self.entries[sid]["shard"]), self.verify)
                sample = _with_draw(sample, self.epoch, draw)
                yield self.transform(sample) if self.transform else sample
        finally:
            for future in pending.values():
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            for handle in files.values():
                handle.close()

    def _remote_handle(self, sample_id: str, files: dict[str, Any]) -> Any:
        """The open shard object holding ``sample_id``; ShardError if missing, altered or unreachable."""
        name = self.entries[sample_id]["shard"]
        if name not in files:
            where = self.shards_dir / name
            try:
                handle = where.open_input()
                size = handle.size()
            except FileNotFoundError:
                raise ShardError(f"{where}: shard missing (needed for sample {sample_id})") from None
            except (OSError, StorageError) as err:
                raise ShardError(f"{where}: cannot open shard (needed for sample {sample_id}): {err}") from err
            if size != self.shard_bytes[name]:
                handle.close()
                raise ShardError(f"{where}: truncated or altered tar ({size} bytes, index says "
                                 f"{self.shard_bytes[name]}); needed for sample {sample_id}")
            files[name] = handle
        return files[name]

    def _fetch(self, sample_id: str, handle: Any) -> bytes:
        """The bytes of one sample: one range request (retried with backoff by the S3 client)."""
        entry = self.entries[sample_id]
        try:
            return handle.read_at(entry["size"], entry["offset"])
        except OSError as err:
            raise ShardError(f"{self.shards_dir / entry['shard']}: sample {sample_id}: read failed: {err}") from err

    def _handle(self, sample_id: str, files: OrderedDict[str, BinaryIO]) -> BinaryIO:
        """The open shard file holding ``sample_id`` (a few stay open); ShardError if missing or truncated."""
        name = self.entries[sample_id]["shard"]
        if name not in files:
            path = self.shards_dir.local / name
            try:
                handle = open(path, "rb", buffering=0)
            except FileNotFoundError:
                raise ShardError(f"{path}: shard missing (needed for sample {sample_id})") from None
            size = os.fstat(handle.fileno()).st_size
            if size != self.shard_bytes[name]:
                handle.close()
                raise ShardError(f"{path}: truncated or altered tar ({size} bytes, index says "
                                 f"{self.shard_bytes[name]}); needed for sample {sample_id}")
            files[name] = handle
            if len(files) > self.open_files:
                files.popitem(last=False)[1].close()
        files.move_to_end(name)
        return files[name]

    def _prefetch(self, sample_id: str, files: OrderedDict[str, BinaryIO]) -> None:
        """Ask the kernel to start reading a coming sample, so disk reads overlap decoding."""
        if hasattr(os, "posix_fadvise"):
            entry = self.entries[sample_id]
            os.posix_fadvise(self._handle(sample_id, files).fileno(), entry["offset"], entry["size"],
                             os.POSIX_FADV_WILLNEED)

    def _read(self, sample_id: str, files: OrderedDict[str, BinaryIO]) -> dict[str, Any]:
        handle = self._handle(sample_id, files)
        where = str(self.shards_dir / self.entries[sample_id]["shard"])
        return read_sample(handle, self.entries[sample_id], sample_id, where, verify=self.verify)

    def loader(self, num_workers: int = 0, collate_fn: Callable | None = collate, **kwargs: Any) -> StreamLoader:
        """A DataLoader over this source that keeps ``state_dict()`` in step with the batches consumed."""
        return StreamLoader(self, num_workers=num_workers, collate_fn=collate_fn, **kwargs)


class StreamLoader:
    """Iterate one epoch of a StreamSource in batches; the source's (epoch, step) follow consumption.

    A new DataLoader is built per epoch (workers are not persistent: they must see the current epoch
    and step). After the last batch the source moves to (epoch + 1, 0).
    """

    def __init__(self, source: StreamSource, num_workers: int = 0, collate_fn: Callable | None = collate,
                 **kwargs: Any) -> None:
        if kwargs.get("persistent_workers"):
            raise ShardError("StreamSource loaders cannot use persistent workers (they would miss the epoch)")
        if "batch_size" in kwargs:
            raise ShardError("the batch size is the StreamSource's batch_size")
        self.source, self.num_workers, self.collate_fn, self.kwargs = source, num_workers, collate_fn, kwargs

    def __len__(self) -> int:
        return self.source.batches_per_epoch - self.source.step

    def __iter__(self) -> Iterator[Any]:
        loader = DataLoader(self.source, batch_size=self.source.batch_size, num_workers=self.num_workers,
                            collate_fn=self.collate_fn, **self.kwargs)
        for batch in loader:
            self.source.step += 1  # counted before the consumer sees it: a checkpoint now resumes after it
            yield batch
        if self.source.step >= self.source.batches_per_epoch:
            self.source.set_epoch(self.source.epoch + 1)

