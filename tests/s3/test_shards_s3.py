"""Shards on S3 (SeaweedFS): export -> verify -> StreamSource by range reads, and every fault named."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from octssl.cli import app
from octssl.data.sources import StreamSource
from octssl.dev.s3local import LocalS3
from octssl.errors import ShardError
from octssl.storage.location import Location
from octssl.webds.export import export_shards
from octssl.webds.verify import verify_shards


@pytest.fixture
def s3_shards(tiny_corpus: Path, s3: str) -> str:
    url = f"{s3}/shards"
    result = CliRunner().invoke(app, ["export-shards", str(tiny_corpus), "--out", url, "-k", "5"])
    assert result.exit_code == 0, result.output
    return url


def test_export_verify_and_stream_match_local(s3_shards: str, tiny_corpus: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    assert not Path("s3:").exists()  # the URL was not taken for a local folder
    names = [loc.name for loc in Location.parse(s3_shards).files()]
    assert names == ["index.json", *(f"shard-{i:06d}.tar" for i in range(5))]
    result = CliRunner().invoke(app, ["verify", s3_shards])
    assert result.exit_code == 0 and "ok" in result.output, result.output
    local = tmp_path / "local"
    export_shards(tiny_corpus, local, samples_per_shard=5, progress=False)
    for shard in ("shard-000000.tar", "shard-000004.tar"):  # byte-identical exports
        assert (Location.parse(s3_shards) / shard).read_bytes() == (local / shard).read_bytes()
    remote_source = StreamSource(s3_shards, batch_size=2, seed=1, prefetch=3)
    local_source = StreamSource(local, batch_size=2, seed=1, prefetch=3)
    remote, here = list(remote_source), list(local_source)
    assert [s["id"] for s in remote] == [s["id"] for s in here] and len(remote) == 24
    for a, b in zip(remote, here, strict=True):
        assert np.array_equal(a["oct"], b["oct"]) and a["meta"] == b["meta"]
    batches = list(StreamSource(s3_shards, batch_size=3, seed=1).loader(num_workers=2, collate_fn=list))
    assert [s["id"] for b in batches for s in b] == [s["id"] for s in here][:24]


def test_export_refuses_to_overwrite_an_s3_export(s3_shards: str, tiny_corpus: Path):
    with pytest.raises(ShardError, match="already holds an export"):
        export_shards(tiny_corpus, s3_shards, progress=False)


def test_corrupt_object_is_named(s3_shards: str):
    shard = Location.parse(s3_shards) / "shard-000002.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF  # inside the first sample's .npy payload
    shard.write_bytes(bytes(data))
    problems = verify_shards(s3_shards)
    assert any(p.startswith(f"{shard}: tar sha256 mismatch") for p in problems), problems
    assert any(str(shard) in p and "sha256 mismatch (corrupt shard)" in p for p in problems), problems
    source = StreamSource(s3_shards, batch_size=1)
    with pytest.raises(ShardError, match=r"shard-000002\.tar: sample .*sha256 mismatch"):
        list(source)


def test_missing_object_is_named(s3_shards: str):
    (Location.parse(s3_shards) / "shard-000001.tar").delete()
    assert any("shard-000001.tar: missing" in p for p in verify_shards(s3_shards))
    with pytest.raises(ShardError, match=r"shard-000001\.tar: shard missing"):
        list(StreamSource(s3_shards, batch_size=1, shuffle_window=1))


def test_wrong_credentials_fail_clearly(s3_shards: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    result = CliRunner().invoke(app, ["verify", s3_shards])
    assert result.exit_code != 0 and "access denied to bucket 'octssl'" in result.output, result.output


def test_server_stopped_mid_read_fails_without_hanging(tiny_corpus: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch):
    """A second server of our own, killed while a StreamSource is reading from it."""
    with LocalS3(tmp_path / "doomed") as server:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        url = f"s3://{server.bucket}/shards"
        export_shards(tiny_corpus, url, samples_per_shard=5, progress=False)
        source = iter(StreamSource(url, batch_size=1, prefetch=1))
        next(source)
        server.stop(grace_s=0)
        start = time.monotonic()
        with pytest.raises(ShardError, match=rf"{url}/shard-\d+\.tar"):
            list(source)
        assert time.monotonic() - start < 60
