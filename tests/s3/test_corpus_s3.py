"""A corpus on S3: `octssl publish` (manifest last, verified, resumable) and read-only Corpus.open(url)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from octssl.cli import app
from octssl.corpus import publish as pub
from octssl.corpus.store import Corpus
from octssl.data.sources import ZarrSource
from octssl.errors import CorpusError
from octssl.storage.location import Location

from .conftest import damage_first_oct_shard


def test_publish_then_read_every_sample_like_local(tiny_corpus: Path, s3: str):
    url = f"{s3}/corpus"
    result = CliRunner().invoke(app, ["publish", str(tiny_corpus), url])
    assert result.exit_code == 0 and "published 24 samples" in result.output, result.output
    assert not (Location.parse(url) / pub.LEDGER_NAME).exists()
    local, remote = Corpus.open(tiny_corpus), Corpus.open(url)
    assert remote.remote and remote.rows == local.rows
    for sid in local.ids(raster_only=False):
        a, b = local.read(sid, verify=True), remote.read(sid, verify=True)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a if k not in ("id", "meta"))
    assert remote.backend.chunks.served > 0 and remote.backend.chunks.declined == 0  # the range-read fast path served them
    source = ZarrSource(url, split="train")
    assert len(source) == len(local.ids(split="train")) and source[0]["oct"].dtype == np.uint8
    again = CliRunner().invoke(app, ["publish", str(tiny_corpus), url])
    assert again.exit_code == 0 and "already published" in again.output
    with pytest.raises(CorpusError, match="read-only"):
        remote.append([])


def test_interrupted_publish_shows_no_corpus_and_resumes(make_corpus, s3: str, monkeypatch: pytest.MonkeyPatch):
    path = make_corpus(volumes=6)
    url = f"{s3}/corpus"
    real_upload, calls = Location.upload, []

    def failing(self: Location, source: str | Path) -> None:
        calls.append(self.name)
        if len(calls) == 3:
            raise OSError("connection reset (simulated)")
        real_upload(self, source)

    monkeypatch.setattr(pub, "LEDGER_EVERY_BYTES", 1)  # ledger after every file
    monkeypatch.setattr(Location, "upload", failing)
    with pytest.raises(OSError, match="simulated"):
        pub.publish(path, url, progress=False)
    with pytest.raises(CorpusError, match="manifest is missing"):
        Corpus.open(url)  # a half-published corpus is not a corpus
    monkeypatch.setattr(Location, "upload", real_upload)
    done = pub.publish(path, url, progress=False)
    assert done["skipped"] == 2 and done["files"] > 2  # the two uploaded before the failure were kept
    assert len(Corpus.open(url)) == 6


def test_corrupt_published_object_is_named(make_corpus, s3: str):
    path = make_corpus(volumes=4)
    url = f"{s3}/corpus"
    pub.publish(path, url, progress=False)
    shard = damage_first_oct_shard(url)
    with pytest.raises(CorpusError, match=str(shard).replace(".", r"\.")):
        for r in Corpus.open(url).rows:
            Corpus.open(url).read(r["id"], verify=True)


def test_finetune_preflight_reads_a_published_corpus(tiny_corpus: Path, s3: str):
    from octssl.config.job import load_config
    from octssl.train.launch import preflight

    url = f"{s3}/corpus"
    pub.publish(tiny_corpus, url, progress=False)
    jobs = Path(__file__).resolve().parents[2] / "jobs"
    config = load_config(jobs / "finetune_ga.yaml", [f"data.corpus={url}", "data.crop=[16, 64]", "model.width=0.25",
                                                     f"run.storage_path={s3}/runs"])
    facts = preflight(config)
    local = Corpus.open(tiny_corpus)
    assert facts["val_volumes"] == len(local.ids(split="val", require=("oct", "ga")))


def test_published_corpus_in_sub_volume_chunks_reads_crops_and_volumes(tmp_path: Path, s3: str):
    """Sub-volume chunks on S3: crops by range requests of their chunks, whole volumes through Zarr (whose
    ranged read of a shard's first chunk fsspec's pyarrow wrapper used to refuse)."""
    from octssl.corpus import region

    rng = np.random.default_rng(0)
    local = Corpus.create(tmp_path / "chunked", volume_chunk=(4, 8), shard_bytes=3 * 12 * 16 * 24)
    local.append([{"id": f"s{i}", "oct": rng.integers(0, 256, (12, 16, 24), dtype=np.uint8),
                   "meta": {"patient": f"p{i}", "eye": "OD", "visit": 0, "device": "test", "scan_pattern": "raster",
                            "spacing_mm": (0.1, 0.01, 0.1), "split": "train"}} for i in range(4)], progress=False)
    pub.publish(tmp_path / "chunked", f"{s3}/chunked", progress=False)
    remote = Corpus.open(f"{s3}/chunked")
    served = region._reader.served
    for sid in ("s0", "s3"):
        whole = local.read(sid)["oct"]
        assert np.array_equal(remote.read(sid)["oct"], whole)
        crop = region.read_crop(remote, sid, slice(2, 9), slice(5, 20))
        assert np.array_equal(crop["oct"], whole[2:9, :, 5:20])
    assert region._reader.served == served + 2
