"""ZarrSource and StreamSource: same samples, equal batches per rank, per-epoch shuffle, exact resume, damage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from octssl.corpus.store import Corpus
from octssl.data.sources import StreamSource, ZarrSource
from octssl.data.transforms import TrainTransform
from octssl.errors import ShardError
from octssl.webds.export import export_shards
from octssl.webds.index import INDEX_NAME

ARRAYS = ("oct", "faf", "slo", "ga", "rpd")


@pytest.fixture(scope="module")
def shards(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only export of the 24-volume tiny corpus in 5 shards (counts 5, 5, 5, 5, 4)."""
    out = tmp_path_factory.mktemp("stream") / "shards"
    export_shards(tiny_corpus, out, samples_per_shard=5, progress=False)
    return out


def _ids_only(samples: list[dict]) -> list[str]:
    """Collate to ids: raw samples differ in modalities (labelled or not), which `collate` rejects."""
    return [sample["id"] for sample in samples]


def _epoch_ids(source: StreamSource, workers: int = 0) -> list[list[str]]:
    return list(source.loader(num_workers=workers, collate_fn=_ids_only))


def test_both_sources_give_identical_samples(tiny_corpus: Path, shards: Path):
    zarr_source = ZarrSource(tiny_corpus, split=None)
    streamed = list(StreamSource(shards, batch_size=1))
    assert sorted(s["id"] for s in streamed) == sorted(zarr_source.ids)
    for sample in streamed:
        reference = zarr_source[zarr_source.ids.index(sample["id"])]
        assert set(sample) == set(reference)
        for key in ARRAYS:
            if key in reference:
                assert sample[key].dtype == reference[key].dtype == np.uint8
                np.testing.assert_array_equal(sample[key], reference[key])
        assert sample["meta"] == {**reference["meta"], "draw": sample["meta"]["draw"]}


def test_zarr_source_filters_repeats_and_transforms(tiny_corpus: Path):
    corpus = Corpus.open(tiny_corpus)
    train = ZarrSource(corpus, split="train", repeats=3)
    assert train.ids == corpus.ids(split="train") and len(train) == 3 * len(train.ids)
    assert train[len(train.ids)]["id"] == train.ids[0]
    labelled = ZarrSource(corpus, split="train", label="ga", label_fraction=0.5)
    assert labelled.ids == corpus.ids(label="ga", label_fraction=0.5) and all("ga" in labelled[i] for i in range(2))
    transform = TrainTransform(crop=(8, 32), targets=("faf",), seed=1)
    augmented = ZarrSource(corpus, split="train", transform=transform, repeats=2)
    first, second = augmented[0], augmented[len(augmented.ids)]  # same volume, two draws
    assert first["oct"].shape == (1, 8, 64, 32) and first["faf"].dtype == np.float32
    assert not np.array_equal(first["oct"], second["oct"])
    np.testing.assert_array_equal(augmented[0]["oct"], first["oct"])
    with pytest.raises(IndexError):
        train[len(train)]


def test_zarr_source_in_loader_workers(tiny_corpus: Path):
    source = ZarrSource(tiny_corpus, split="train")
    loader = DataLoader(source, batch_size=4, num_workers=2, collate_fn=_ids_only)
    ids = [sid for batch in loader for sid in batch]
    assert ids == source.ids


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_rank_yields_the_same_number_of_full_batches(shards: Path, world_size: int):
    batch_size = 3
    expected = 24 // (world_size * batch_size)
    per_rank = []
    for rank in range(world_size):
        source = StreamSource(shards, rank=rank, world_size=world_size, batch_size=batch_size, seed=5)
        batches = _epoch_ids(source, workers=2 if rank == 0 else 0)
        assert len(batches) == expected
        assert all(len(b) == batch_size for b in batches)
        assert source.state_dict() == {"epoch": 1, "step": 0}
        per_rank.append([sid for b in batches for sid in b])
    everything = [sid for ids in per_rank for sid in ids]
    assert len(everything) == len(set(everything)), "ranks must not share samples within an epoch"


def test_padding_fills_a_larger_epoch_from_the_rank_own_samples(shards: Path):
    ranks = [StreamSource(shards, rank=r, world_size=2, batch_size=4, batches_per_epoch=5) for r in range(2)]
    orders = [source.epoch_order(0) for source in ranks]
    assert [len(o) for o in orders] == [20, 20]
    assert len(set(orders[0])) == 12 and not set(orders[0]) & set(orders[1])
    assert len(_epoch_ids(ranks[1], workers=2)) == 5


def test_split_filter_and_too_few_samples(tiny_corpus: Path, shards: Path):
    train = Corpus.open(tiny_corpus).ids(split="train")
    source = StreamSource(shards, split="train", batch_size=2)
    assert source.total == len(train)
    assert set(source.epoch_order(0)) <= set(train)
    with pytest.raises(ShardError, match="cannot fill one batch"):
        StreamSource(shards, batch_size=25)


def test_shard_order_reshuffles_per_epoch_and_seed(shards: Path):
    source = StreamSource(shards, batch_size=2, seed=0)
    assert source.epoch_order(0) == StreamSource(shards, batch_size=2, seed=0).epoch_order(0)
    assert source.epoch_order(0) != source.epoch_order(1)
    assert source.epoch_order(0) != StreamSource(shards, batch_size=2, seed=1).epoch_order(0)
    assert sorted(source.epoch_order(0)) == sorted(source.epoch_order(1))


def test_batch_order_does_not_depend_on_loader_workers(shards: Path):
    kwargs = {"rank": 1, "world_size": 2, "batch_size": 2, "seed": 3}
    assert _epoch_ids(StreamSource(shards, **kwargs), 0) == _epoch_ids(StreamSource(shards, **kwargs), 2)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(shards: Path, workers: int):
    kwargs = {"rank": 0, "world_size": 2, "batch_size": 2, "seed": 11,
              "transform": TrainTransform(crop=(8, 32), targets=("faf",), seed=2)}
    uninterrupted = StreamSource(shards, **kwargs)
    uninterrupted.set_epoch(1)
    reference = list(uninterrupted.loader(num_workers=workers))
    assert len(reference) == 6

    first = StreamSource(shards, **kwargs)
    first.set_epoch(1)
    consumed = []
    for batch in first.loader(num_workers=workers):
        consumed.append(batch)
        if len(consumed) == 3:
            break
    state = first.state_dict()
    assert state == {"epoch": 1, "step": 3}

    resumed = StreamSource(shards, **kwargs)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as it travels inside a checkpoint
    rest = list(resumed.loader(num_workers=workers))
    assert [b["id"] for b in consumed + rest] == [b["id"] for b in reference]
    for got, want in zip(consumed + rest, reference, strict=True):
        assert torch.equal(got["oct"], want["oct"]) and torch.equal(got["faf"], want["faf"])
    assert resumed.state_dict() == {"epoch": 2, "step": 0}


def _damage_copy(shards: Path, tmp_path: Path) -> tuple[Path, dict]:
    copy = Path(shutil.copytree(shards, tmp_path / "copy"))
    return copy, json.loads((copy / INDEX_NAME).read_text())


def test_checksum_mismatch_names_shard_and_sample(shards: Path, tmp_path: Path):
    copy, index = _damage_copy(shards, tmp_path)
    victim = index["shards"][2]["ids"][3]
    entry = index["samples"][victim]
    path = copy / entry["shard"]
    data = bytearray(path.read_bytes())
    data[entry["offset"] + 512 + 128 + 77] ^= 0x01  # one voxel, same file size
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"{entry['shard']}: sample {victim}: 'oct' sha256 mismatch"):
        list(StreamSource(copy, batch_size=1))


def test_truncated_or_missing_shard_names_the_shard(shards: Path, tmp_path: Path):
    copy, index = _damage_copy(shards, tmp_path)
    name = index["shards"][1]["name"]
    with open(copy / name, "r+b") as handle:
        handle.truncate(index["shards"][1]["bytes"] - 3000)
    with pytest.raises(ShardError, match=rf"{name}: truncated"):
        list(StreamSource(copy, batch_size=1))
    (copy / name).unlink()
    with pytest.raises(ShardError, match=rf"{name}: shard missing"):
        list(StreamSource(copy, batch_size=1))
    (copy / INDEX_NAME).unlink()
    with pytest.raises(ShardError, match="index.json: missing"):
        StreamSource(copy)
