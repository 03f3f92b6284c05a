"""Ingest pipeline behaviour: pseudonym keys, CLI, --strict, crash-safe batches, process pool, duplicates."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from octssl.cli import app
from octssl.corpus.store import Corpus
from octssl.errors import IngestError
from octssl.ingest.phi import KEY_ENV
from octssl.ingest.pipeline import ingest, parse_grid

LINE_FILE, CIRCLE_FILE = "Willis_B_716_0.vol", "Willis_B_716_2.vol"


def patients(path: Path) -> set[str]:
    return set(Corpus.open(path).manifest.column("patient").to_pylist())


def test_key_required_stable_or_ephemeral(tmp_path: Path, vol_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(IngestError, match="refuses to run without a pseudonym key"):
        ingest([vol_dir / LINE_FILE], tmp_path / "refused", workers=1, progress=False)
    assert not (tmp_path / "refused").exists()  # refused before anything was written
    first = ingest([vol_dir / LINE_FILE], tmp_path / "e1", workers=1, progress=False, ephemeral_key=True)
    ingest([vol_dir / LINE_FILE], tmp_path / "e2", workers=1, progress=False, ephemeral_key=True)
    assert first.ephemeral_key and patients(tmp_path / "e1") != patients(tmp_path / "e2")
    monkeypatch.setenv(KEY_ENV, "site-secret")
    ingest([vol_dir / LINE_FILE], tmp_path / "k1", workers=1, progress=False)
    ingest([vol_dir / CIRCLE_FILE], tmp_path / "k2", workers=1, progress=False)
    # same key, same device patient id (both files are patient '01234'): same pseudonym across ingests
    assert patients(tmp_path / "k1") == patients(tmp_path / "k2") and len(patients(tmp_path / "k1")) == 1


def test_cli_ingest_strict_and_refusal(tmp_path: Path, mixed_sources: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    monkeypatch.delenv(KEY_ENV, raising=False)
    refused = runner.invoke(app, ["ingest", str(mixed_sources), "--out", str(tmp_path / "c0"), "--workers", "1"])
    assert refused.exit_code == 1 and KEY_ENV in refused.output
    loud = runner.invoke(app, ["ingest", str(mixed_sources / LINE_FILE), "--out", str(tmp_path / "c1"),
                               "--workers", "1", "--ephemeral-key"])
    assert loud.exit_code == 0 and "EPHEMERAL" in loud.output
    monkeypatch.setenv(KEY_ENV, "site-secret")
    strict = runner.invoke(app, ["ingest", str(mixed_sources), "--out", str(tmp_path / "c2"), "--workers", "1",
                                 "--strict", "--grid", "49,128,512"])
    assert strict.exit_code == 1, strict.output
    assert "truncated.vol" in strict.output and "rejected 3" in strict.output
    assert len(Corpus.open(tmp_path / "c2")) == 2  # the good files landed before --strict failed the command
    lenient = runner.invoke(app, ["ingest", str(mixed_sources), "--out", str(tmp_path / "c2"), "--workers", "1"])
    assert lenient.exit_code == 0 and "skipped 2 already ingested" in lenient.output
    bad_grid = runner.invoke(app, ["ingest", str(mixed_sources), "--out", str(tmp_path / "c3"), "--grid", "49,128"])
    assert bad_grid.exit_code == 2 and "NB,D,W" in bad_grid.output


def test_parse_grid() -> None:
    assert parse_grid("49,128,512") == (49, 128, 512) == parse_grid("49x128x512")
    with pytest.raises(IngestError):
        parse_grid("49,0,512")


def test_crash_mid_ingest_keeps_committed_batches_and_resumes(
    tmp_path: Path, mixed_sources: Path, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def crash_on_second_append(stage: str) -> None:
        if stage == "written":
            calls.append(stage)
            if len(calls) == 2:
                raise RuntimeError("simulated crash while appending")

    out = tmp_path / "corpus"
    monkeypatch.setattr(Corpus, "append_hook", staticmethod(crash_on_second_append))
    with pytest.raises(RuntimeError, match="simulated crash"):
        ingest([mixed_sources], out, workers=1, progress=False, batch_size=1)
    monkeypatch.setattr(Corpus, "append_hook", None)
    corpus = Corpus.open(out)
    assert len(corpus) == 1 and corpus.verify() == []  # the first batch, nothing of the failed one
    resumed = ingest([mixed_sources], out, workers=1, progress=False, batch_size=1)
    assert len(resumed.ingested) == 1 and len(resumed.skipped) == 1
    assert len(Corpus.open(out)) == 2 and Corpus.open(out).verify() == []


def test_process_pool_matches_inline_and_duplicates_are_skipped(tmp_path: Path, vol_dir: Path, key: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in (LINE_FILE, CIRCLE_FILE):
        shutil.copyfile(vol_dir / name, src / name)
    shutil.copyfile(vol_dir / LINE_FILE, src / "copy_of_line.vol")  # same content, another name
    inline = ingest([src], tmp_path / "inline", workers=1, progress=False)
    pooled = ingest([src], tmp_path / "pooled", workers=2, progress=False)
    assert pooled.executor == "processes:2" and inline.executor == "inline"
    assert len(inline.ingested) == 2 and len(inline.skipped) == 1  # the copy is not ingested twice

    def rows(path: Path) -> list[tuple]:
        return sorted((r["id"], r["patient"], r["sha256"]["oct"], r["sha256"]["slo"])
                      for r in Corpus.open(path).manifest.to_pylist())

    assert rows(tmp_path / "inline") == rows(tmp_path / "pooled")


@pytest.mark.slow
def test_ray_tasks_when_a_cluster_is_running(tmp_path: Path, vol_dir: Path, key: str) -> None:
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        report = ingest([vol_dir], tmp_path / "corpus", workers=2, progress=False)
    finally:
        ray.shutdown()
    assert report.executor == "ray" and len(report.ingested) == 2
