"""A corpus keeps one pseudonym key (issue 26.1) and refusals speak of the command run (issue 26.8)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from octssl.cli import app
from octssl.corpus.store import Corpus
from octssl.errors import IngestError
from octssl.ingest.phi import KEY_ENV, key_fingerprint
from octssl.ingest.pipeline import ingest

LINE_FILE, CIRCLE_FILE = "Willis_B_716_0.vol", "Willis_B_716_2.vol"


def one_line(text: str) -> str:
    return " ".join(text.split())


def test_a_second_key_is_refused_and_the_patient_stays_one(tmp_path: Path, vol_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Both files are the same patient: with key-B the second ingest would have made `patients / eyes 2 / 2`."""
    corpus = tmp_path / "corpus"
    monkeypatch.setenv(KEY_ENV, "key-A")
    ingest([vol_dir / LINE_FILE], corpus, workers=1, progress=False)
    recorded = Corpus.open(corpus).settings["key_fingerprint"]
    assert recorded == key_fingerprint(b"key-A") and "key-A" not in str(Corpus.open(corpus).settings)
    monkeypatch.setenv(KEY_ENV, "key-B")
    result = CliRunner().invoke(app, ["ingest", str(vol_dir / CIRCLE_FILE), "--out", str(corpus), "--workers", "1"])
    assert result.exit_code == 2, result.output
    text = one_line(result.output)
    assert "another pseudonym key" in text and f"set {KEY_ENV} to the corpus's key" in text and recorded in text
    assert len(Corpus.open(corpus)) == 1  # nothing appended
    with pytest.raises(IngestError, match="another pseudonym key"):
        ingest([vol_dir / CIRCLE_FILE], corpus, workers=1, progress=False, ephemeral_key=True)
    monkeypatch.setenv(KEY_ENV, "key-A")
    ingest([vol_dir / CIRCLE_FILE], corpus, workers=1, progress=False)
    opened = Corpus.open(corpus)
    assert len(opened) == 2 and len(set(opened.manifest.column("patient").to_pylist())) == 1


def test_a_corpus_from_before_fingerprints_records_the_key_at_its_next_ingest(tmp_path: Path, vol_dir: Path,
                                                                            key: str) -> None:
    Corpus.create(tmp_path / "old")  # as corpora were created before: no fingerprint
    ingest([vol_dir / LINE_FILE], tmp_path / "old", workers=1, progress=False)
    assert Corpus.open(tmp_path / "old").settings["key_fingerprint"] == key_fingerprint(key.encode())


def test_ingest_of_a_folder_without_scans_refuses_and_writes_nothing(tmp_path: Path, key: str) -> None:
    empty = tmp_path / "notes"
    empty.mkdir()
    (empty / "README.txt").write_text("no scans here")
    result = CliRunner().invoke(app, ["ingest", str(empty), "--out", str(tmp_path / "c"), "--workers", "1"])
    assert result.exit_code == 2 and "no scans found" in one_line(result.output)
    assert not (tmp_path / "c").exists()


def test_predict_without_a_key_speaks_of_predict(tmp_path: Path, vol_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(vol_dir / LINE_FILE, src / LINE_FILE)
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "no-bundle"), str(src), "--out", str(tmp_path / "p")])
    assert result.exit_code == 2
    text = one_line(result.output)
    assert text.startswith("error: predict on device files refuses to run without a pseudonym key") and "ingest" not in text.split(":")[1]
