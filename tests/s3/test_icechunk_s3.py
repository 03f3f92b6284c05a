"""An icechunk corpus on S3 (SeaweedFS): `octssl publish --icechunk`, appends in place, snapshots, damage."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from octssl.cli import app
from octssl.corpus.icechunk import publish
from octssl.corpus.repository import IcechunkBackend
from octssl.corpus.store import Corpus
from octssl.corpus.synth import samples
from octssl.data.sources import ZarrSource
from octssl.data.version import corpus_version
from octssl.errors import CorpusError, StorageError
from octssl.storage.location import Location

pytest.importorskip("icechunk")
GRID = (8, 32, 32)


def test_publish_append_and_read_every_snapshot_from_s3(s3: str, tmp_path: Path):
    volumes = list(samples(10, GRID, 0, 0.5))
    local = Corpus.create(tmp_path / "corpus")
    local.append(volumes[:6], progress=False)
    url = f"{s3}/corpus"
    result = CliRunner().invoke(app, ["publish", str(local.path), url, "--icechunk"])
    assert result.exit_code == 0 and "published (" in result.output, result.output
    first = re.search(r"@([0-9A-Z]{20})", result.output).group(1)
    local.append(volumes[6:], progress=False)
    second = publish(local.path, url, progress=False)["snapshot_id"]
    local = Corpus.open(local.path)
    now, before = Corpus.open(url), Corpus.open(f"{url}@{first}")
    assert isinstance(now.backend, IcechunkBackend) and (now.snapshot_id, len(now)) == (second, 10)
    assert (before.snapshot_id, len(before)) == (first, 6) and before.rows == local.rows[:6]
    for remote in (now, before):
        for row in remote.rows:
            a, b = local.read(row["id"]), remote.read(row["id"], verify=True)
            assert all(np.array_equal(a[k], b[k]) for k in a if k not in ("id", "meta"))
    source = ZarrSource(url, split=None)
    assert len(source) == 10 and source[3]["oct"].shape == GRID
    assert corpus_version(url)["snapshot_id"] == second
    checked = CliRunner().invoke(app, ["verify", f"{url}@{first}"])
    assert checked.exit_code == 0 and "ok" in checked.output, checked.output
    info = CliRunner().invoke(app, ["info", url])
    assert info.exit_code == 0 and second in info.output, info.output


def test_a_damaged_object_on_s3_is_named_and_bad_destinations_are_refused(s3: str, make_corpus,
                                                                        monkeypatch: pytest.MonkeyPatch):
    path = make_corpus(volumes=4, grid=GRID)
    url = f"{s3}/corpus"
    publish(path, url, progress=False)
    objects = [f for f in (Location.parse(url) / "chunks").files() if not f.read_bytes().startswith(b"PAR1")]
    biggest = max(objects, key=lambda f: f.size())
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    biggest.write_bytes(bytes(data))
    problems = Corpus.open(url).verify()
    assert len(problems) == 1 and re.search(r"/oct/8x32x32/c/\d+/0/0/0: sample \S+: .*damaged object", problems[0])
    other = make_corpus(volumes=4, grid=GRID, seed=1, name="other")
    with pytest.raises(CorpusError, match="holds another corpus"):
        publish(other, url, progress=False)
    from octssl.corpus.publish import publish as publish_plain

    publish_plain(path, f"{s3}/plain", progress=False)
    refused = CliRunner().invoke(app, ["publish", str(path), f"{s3}/plain", "--icechunk"])
    assert refused.exit_code != 0 and "not empty and not an icechunk repository" in refused.output
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(StorageError, match="access denied to bucket 'octssl'") as denied:
        Corpus.open(f"{url}@{'0' * 20}")
    assert "wrong-secret" not in str(denied.value) and "\n" not in str(denied.value)
