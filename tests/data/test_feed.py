"""The one training-data interface: both feeds give equal batches per rank, follow consumption in
``state_dict``, and resume mid-epoch with exactly the batches the uninterrupted run would have seen."""

from __future__ import annotations

from pathlib import Path

import pytest

from octssl.config.job import load_config
from octssl.data.feed import CorpusFeed, ShardFeed, build_train_data
from octssl.errors import ConfigError
from octssl.webds.export import export_shards

JOBS = Path(__file__).resolve().parents[2] / "jobs"


@pytest.fixture(scope="module")
def shards(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("feed") / "shards"
    export_shards(tiny_corpus, out, samples_per_shard=5, progress=False)
    return out


def _config(corpus: Path, shards: Path, source: str, *extra: str):
    return load_config(JOBS / "pretrain.yaml", [
        f"data.corpus={corpus}", f"data.shards={shards}", f"data.source={source}", "data.crop=[8, 32]",
        "data.batch_size=2", "data.crops_per_volume=1", *extra,
    ])


def _ids(batches) -> list[list[str]]:
    return [list(batch["id"]) for batch in batches]


@pytest.mark.parametrize("source, kind", [("zarr", CorpusFeed), ("stream", ShardFeed)])
def test_feed_resumes_mid_epoch_exactly(tiny_corpus: Path, shards: Path, source: str, kind: type) -> None:
    data = build_train_data(_config(tiny_corpus, shards, source), rank=0, world_size=1)
    assert isinstance(data, kind) and data.grids == ["16x64x64"] and data.volume_shape() == (16, 64, 64)
    full = _ids(data.batches(epoch=1, start_step=0))
    assert len(full) == data.steps_per_epoch >= 3
    assert data.state_dict() == {"epoch": 1, "step": data.steps_per_epoch}

    resumed = build_train_data(_config(tiny_corpus, shards, source), rank=0, world_size=1)
    resumed.load_state_dict({"epoch": 1, "step": 2})
    stream = resumed.forever()
    tail = [list(next(stream)["id"]) for _ in range(data.steps_per_epoch - 2)]
    assert tail == full[2:]
    assert resumed.state_dict() == {"epoch": 1, "step": data.steps_per_epoch}
    first_of_next = list(next(stream)["id"])  # the endless stream moves on to epoch 2 from its start
    assert resumed.state_dict() == {"epoch": 2, "step": 1}
    assert [first_of_next] == _ids(build_train_data(_config(tiny_corpus, shards, source)).batches(2, 0))[:1]


@pytest.mark.parametrize("source", ["zarr", "stream"])
def test_ranks_get_equal_disjoint_epochs(tiny_corpus: Path, shards: Path, source: str) -> None:
    ranks = [build_train_data(_config(tiny_corpus, shards, source), rank=r, world_size=2) for r in (0, 1)]
    epochs = [_ids(r.batches(0, 0)) for r in ranks]
    assert len(epochs[0]) == len(epochs[1]) == ranks[0].steps_per_epoch
    seen = [{i for batch in e for i in batch} for e in epochs]
    every = set(build_train_data(_config(tiny_corpus, shards, "zarr")).source.ids)
    assert seen[0] | seen[1] <= every and len(seen[0] | seen[1]) >= len(every) - 2  # batches drop a remainder
    if source == "stream":
        assert not seen[0] & seen[1]  # contiguous slices of one sequence: disjoint


def test_resume_position_outside_an_epoch_is_refused(tiny_corpus: Path, shards: Path) -> None:
    data = build_train_data(_config(tiny_corpus, shards, "zarr"))
    with pytest.raises(ConfigError, match="outside 0.."):
        data.load_state_dict({"epoch": 0, "step": data.steps_per_epoch + 1})


def test_missing_data_is_a_config_error(tiny_corpus: Path, tmp_path: Path) -> None:
    from octssl.corpus.store import Corpus

    with pytest.raises(ConfigError, match="no index.json"):
        build_train_data(_config(tiny_corpus, tmp_path / "nowhere", "stream"))
    Corpus.create(tmp_path / "empty")
    with pytest.raises(ConfigError, match="no train volumes with 'faf'"):
        build_train_data(_config(tmp_path / "empty", tmp_path, "zarr"))


def test_stream_prefetch_comes_from_the_config(tiny_corpus: Path, shards: Path) -> None:
    """``data.prefetch`` sets how many samples each loader worker of a shard feed reads ahead (the range
    requests in flight on an object store); the default is 4."""
    default = build_train_data(_config(tiny_corpus, shards, "stream"))
    deeper = build_train_data(_config(tiny_corpus, shards, "stream", "data.prefetch=12"))
    assert isinstance(default, ShardFeed) and isinstance(deeper, ShardFeed)
    assert (default.stream.prefetch, deeper.stream.prefetch) == (4, 12)
    with pytest.raises(ConfigError, match="prefetch"):
        _config(tiny_corpus, shards, "stream", "data.prefetch=-1")
