"""icechunk corpora in a local folder: `octssl publish --icechunk`, snapshot reads, appends, damage, refusals."""

from __future__ import annotations

import hashlib
import json
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
from octssl.errors import CorpusError

pytest.importorskip("icechunk")
GRID = (8, 32, 32)


def _corpus(path: Path, volumes: list[dict]) -> Corpus:
    corpus = Corpus.create(path)
    corpus.append(volumes, progress=False)
    return corpus


def _same_arrays(local: Corpus, remote: Corpus, ids: list[str]) -> None:
    for sid in ids:
        a, b = local.read(sid, localizer=True), remote.read(sid, verify=True, localizer=True)
        assert a.keys() == b.keys(), sid
        for key in a.keys() - {"id", "meta"}:
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), (sid, key)


def test_publish_reads_back_byte_identical_and_info_verify_work(make_corpus, tmp_path: Path):
    path, repo = make_corpus(volumes=8, grid=GRID), tmp_path / "repo"
    result = CliRunner().invoke(app, ["publish", str(path), str(repo), "--icechunk"])
    assert result.exit_code == 0 and "published (" in result.output, result.output
    snapshot = re.search(r"@([0-9A-Z]{20})", result.output).group(1)
    local, remote = Corpus.open(path), Corpus.open(repo)
    assert isinstance(remote.backend, IcechunkBackend) and remote.snapshot_id == snapshot
    assert remote.rows == local.rows and remote.settings == local.settings
    assert remote.version == hashlib.sha256((path / "manifest.parquet").read_bytes()).hexdigest()
    _same_arrays(local, remote, local.ids(raster_only=False))
    info = CliRunner().invoke(app, ["info", str(repo), "--json"])
    assert info.exit_code == 0, info.output
    summary = json.loads(info.output)
    assert summary["volumes"] == 8 and summary["snapshot_id"] == snapshot and summary["bytes_on_disk"] > 0
    checked = CliRunner().invoke(app, ["verify", str(repo)])
    assert checked.exit_code == 0 and "ok" in checked.output, checked.output
    again = CliRunner().invoke(app, ["publish", str(path), str(repo), "--icechunk"])
    assert again.exit_code == 0 and f"already published 8 samples at {repo}@{snapshot}" in again.output
    with pytest.raises(CorpusError, match="read-only"):
        remote.append([])
    source = ZarrSource(str(repo), split="train")  # what training's data feed builds from data.corpus
    assert len(source) == len(local.ids(split="train"))
    assert source.corpus_path == remote.path  # loader workers reopen the same snapshot
    assert np.array_equal(source[0]["oct"], local.read(source.ids[0])["oct"])


def test_append_then_publish_commits_a_new_snapshot_and_the_old_one_still_reads(tmp_path: Path):
    volumes = list(samples(12, GRID, 0, 0.5))
    local, repo = _corpus(tmp_path / "corpus", volumes[:8]), tmp_path / "repo"
    first = publish(local.path, repo, progress=False)
    assert not first["already"] and first["samples"] == 8
    local.append(volumes[8:], progress=False)
    second = publish(local.path, repo, progress=False)
    new_rows = [row for row in Corpus.open(local.path).rows if row["index"] >= 8]
    assert second["snapshot_id"] != first["snapshot_id"] and second["samples"] == 12
    assert second["arrays"] == sum(len(r["modalities"]) + len(r["labels"]) for r in new_rows)  # only the new rows
    now, before = Corpus.open(repo), Corpus.open(f"{repo}@{first['snapshot_id']}")
    assert now.snapshot_id == second["snapshot_id"] and len(now) == 12
    assert before.snapshot_id == first["snapshot_id"] and len(before) == 8
    _same_arrays(Corpus.open(local.path), now, [row["id"] for row in now.rows])
    _same_arrays(Corpus.open(local.path), before, [row["id"] for row in before.rows])
    assert corpus_version(str(repo))["snapshot_id"] == second["snapshot_id"]
    old = corpus_version(f"{repo}@{first['snapshot_id']}")
    assert old["snapshot_id"] == first["snapshot_id"] and old["manifest_sha256"] == before.version
    assert old["manifest_sha256"] != now.version
    assert CliRunner().invoke(app, ["verify", f"{repo}@{first['snapshot_id']}"]).exit_code == 0


def test_a_damaged_or_missing_object_is_named(make_corpus, tmp_path: Path):
    path, repo = make_corpus(volumes=6, grid=GRID), tmp_path / "repo"
    publish(path, repo, progress=False)
    chunks = sorted((p for p in (repo / "chunks").iterdir() if not p.read_bytes().startswith(b"PAR1")),
                    key=lambda p: p.stat().st_size)
    damaged, deleted = chunks[-1], chunks[-2]  # two OCT volumes, the largest objects but the manifest
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    deleted.unlink()
    problems = Corpus.open(repo).verify()
    assert len(problems) == 2, problems
    assert any("damaged object" in p for p in problems) and any("object missing" in p and "chunks/" in p for p in problems)
    assert all("\n" not in p for p in problems)
    assert all(re.search(r"@[0-9A-Z]{20}/oct/8x32x32/c/\d+/0/0/0: sample \S+: ", p) for p in problems), problems
    checked = CliRunner().invoke(app, ["verify", str(repo)])
    assert checked.exit_code == 1 and "damaged object" in checked.output


def test_refusals_are_one_line_errors(make_corpus, tmp_path: Path):
    path, repo = make_corpus(volumes=4, grid=GRID), tmp_path / "repo"
    publish(path, repo, progress=False)
    other = make_corpus(volumes=4, grid=GRID, seed=1, name="other")
    refused = CliRunner().invoke(app, ["publish", str(other), str(repo), "--icechunk"])
    assert refused.exit_code != 0 and "holds another corpus" in refused.output and "Traceback" not in refused.output
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("not a corpus")
    refused = CliRunner().invoke(app, ["publish", str(path), str(busy), "--icechunk"])
    assert refused.exit_code != 0 and "not empty and not an icechunk repository" in refused.output
    missing = CliRunner().invoke(app, ["info", f"{repo}@{'0' * 20}"])
    assert missing.exit_code != 0 and "no such snapshot" in missing.output
    snapshot = Corpus.open(repo).snapshot_id
    with pytest.raises(CorpusError, match="not to a snapshot"):
        publish(path, f"{repo}@{snapshot}", progress=False)


def test_a_damaged_manifest_object_is_named(make_corpus, tmp_path: Path):
    path, repo = make_corpus(volumes=4, grid=GRID), tmp_path / "repo"
    publish(path, repo, progress=False)
    stored = next(p for p in (repo / "chunks").iterdir() if p.read_bytes().startswith(b"PAR1"))
    stored.write_bytes(stored.read_bytes()[:-9] + b"damaged!!")
    with pytest.raises(CorpusError, match=r"manifest.parquet/c/0: the manifest's sha256 differs"):
        Corpus.open(repo)


def test_a_publish_stopped_before_its_commit_leaves_the_old_snapshot_and_runs_again(tmp_path: Path,
                                                                                    monkeypatch: pytest.MonkeyPatch):
    from octssl.corpus import icechunk as ice

    volumes = list(samples(8, GRID, 0, 0.5))
    local, repo = _corpus(tmp_path / "corpus", volumes[:5]), tmp_path / "repo"
    first = publish(local.path, repo, progress=False)["snapshot_id"]
    local.append(volumes[5:], progress=False)

    def stop(*args: object) -> None:
        raise KeyboardInterrupt  # the new arrays are uploaded, the commit not made

    monkeypatch.setattr(ice, "_verify_written", stop)
    with pytest.raises(KeyboardInterrupt):
        publish(local.path, repo, progress=False)
    reader = Corpus.open(repo)
    assert (reader.snapshot_id, len(reader)) == (first, 5) and reader.verify() == []
    monkeypatch.undo()
    again = publish(local.path, repo, progress=False)
    assert again["snapshot_id"] != first and len(Corpus.open(repo)) == 8


def test_a_resumed_run_keeps_the_snapshot_it_started_on(tmp_path: Path):
    """A run names the snapshot it reads when it starts; resuming it after a new publish reads that snapshot
    again (from the run's saved config), not the new tip."""
    from octssl.config.job import dump_config, load_config
    from octssl.train.launch import name_run

    volumes = list(samples(10, GRID, 0, 0.5))
    local, repo = _corpus(tmp_path / "corpus", volumes[:8]), tmp_path / "repo"
    first = publish(local.path, repo, progress=False)
    jobs = Path(__file__).resolve().parents[2] / "jobs"
    config = load_config(jobs / "pretrain.yaml", [f"data.corpus={repo}", f"run.storage_path={tmp_path / 'runs'}",
                                                  "run.name=pinned"])
    started = name_run(config, resume=False)
    assert started.data.corpus == f"{repo}@{first['snapshot_id']}"
    run_dir = Path(started.run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(started))
    local.append(volumes[8:], progress=False)
    second = publish(local.path, repo, progress=False)
    assert name_run(config, resume=True).data.corpus == f"{repo}@{first['snapshot_id']}"
    fresh = load_config(jobs / "pretrain.yaml", [f"data.corpus={repo}", f"run.storage_path={tmp_path / 'runs'}",
                                                 "run.name=fresh"])
    assert name_run(fresh, resume=False).data.corpus == f"{repo}@{second['snapshot_id']}"


def test_appended_volumes_lacking_some_arrays_publish_a_snapshot_that_verifies(tmp_path: Path):
    """Volumes appended with OCT only (e.g. ingested B-scan stacks) grow every array of their grid locally;
    the republished snapshot must mirror that, or verify finds arrays of one grid differing in length."""
    volumes = list(samples(10, GRID, 0, 1.0))
    local, repo = _corpus(tmp_path / "corpus", volumes[:8]), tmp_path / "repo"
    publish(local.path, repo, progress=False)
    bare = [{k: v for k, v in volume.items() if k not in ("faf", "slo", "ga", "rpd")} for volume in volumes[8:]]
    local.append(bare, progress=False)
    publish(local.path, repo, progress=False)
    tip = Corpus.open(repo)
    assert len(tip) == 10 and tip.verify() == [] == Corpus.open(local.path).verify()
    _same_arrays(Corpus.open(local.path), tip, [row["id"] for row in tip.rows])
