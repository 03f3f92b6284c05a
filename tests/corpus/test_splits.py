"""Splits that give every task what it needs, or say plainly why not (issue 26.4)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from octssl.cli import app
from octssl.corpus.layout import assign_split, labelled_per_split, split_shortfall
from octssl.corpus.store import Corpus

ROOT = Path(__file__).resolve().parents[2]


def sample(patient: str, ga: bool, split: str | None = None, index: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(abs(hash((patient, index))) % 2**32)
    meta = {"patient": patient, "eye": "OD", "visit": index + 1, "device": "test", "scan_pattern": "raster",
            "spacing_mm": [0.1, 0.01, 0.01], "raster": True, "source": f"test:{patient}:{index}"}
    if split:
        meta["split"] = split
    out: dict[str, Any] = {"id": f"{patient}-{index}", "oct": rng.integers(0, 255, (4, 64, 16), dtype=np.uint8),
                           "meta": meta}
    if ga:
        out["ga"] = np.zeros((4, 16), np.uint8)
        out["ga"][1:3, 2:5] = 1
    return out


def patients_hashed_to(split: str, count: int) -> list[str]:
    names = (f"p{i:04d}" for i in range(10_000))
    return [name for name in names if assign_split(name, (0.6, 0.2, 0.2)) == split][:count]


def splits(corpus: Corpus) -> dict[str, str]:
    return {row["patient"]: row["split"] for row in corpus.rows}


def test_a_small_corpus_that_hashing_puts_all_in_train_gets_val_and_test(tmp_path: Path) -> None:
    """Three patients whose hash says train: before, all three trained and val/test were empty."""
    names = patients_hashed_to("train", 4)
    corpus = Corpus.create(tmp_path / "c")
    corpus.append([sample(name, ga=True) for name in names[:3]], progress=False)
    assert sorted(splits(corpus).values()) == ["test", "train", "val"]
    counts = labelled_per_split(corpus.rows)["ga"]
    assert counts == {"train": 1, "val": 1, "test": 1}
    corpus.append([sample(names[3], ga=True), sample(names[0], ga=True, index=1)], progress=False)
    reopened = splits(Corpus.open(tmp_path / "c"))
    assert reopened[names[3]] == "train" and reopened == {**splits(corpus), names[3]: "train"}  # committed stay


def test_labels_fill_an_empty_split_only_from_a_split_that_keeps_one(tmp_path: Path) -> None:
    """Volumes everywhere but GA only in train: one GA patient moves to val, the other stays in train."""
    train = patients_hashed_to("train", 2)
    val, test = patients_hashed_to("val", 1), patients_hashed_to("test", 1)
    corpus = Corpus.create(tmp_path / "c")
    corpus.append([sample(train[0], ga=True), sample(train[1], ga=True), sample(val[0], ga=False),
                   sample(test[0], ga=False)], progress=False)
    counts = labelled_per_split(corpus.rows)["ga"]
    assert counts["train"] == 1 and counts["val"] + counts["test"] == 1
    assert splits(corpus)[val[0]] == "val" and splits(corpus)[test[0]] == "test"


def test_hash_assignment_that_fills_every_split_and_given_splits_are_kept(tmp_path: Path) -> None:
    names = [f"q{i:03d}" for i in range(30)]
    corpus = Corpus.create(tmp_path / "hashed")
    corpus.append([sample(name, ga=i % 2 == 0) for i, name in enumerate(names)], progress=False)
    assert splits(corpus) == {name: assign_split(name, (0.6, 0.2, 0.2)) for name in names}
    given = Corpus.create(tmp_path / "given")  # as synth (and so the demo's corpus) gives every split itself
    given.append([sample(name, ga=True, split="train") for name in names[:3]], progress=False)
    assert set(splits(given).values()) == {"train"}


def test_the_demo_corpus_keeps_its_split_assignment(tmp_path: Path) -> None:
    from octssl.corpus.synth import samples, synthesize

    grid = (4, 8, 16)
    corpus = synthesize(tmp_path / "demo", volumes=200, grid=grid, seed=0, labelled=0.5)
    planned = {s["id"]: s["meta"]["split"] for s in samples(200, grid, 0, 0.5)}
    assert {row["id"]: row["split"] for row in corpus.rows} == planned


@pytest.fixture
def train_only_labels(tmp_path: Path) -> Path:
    """GA only in train (given splits, as a corpus labelled after ingest can end up)."""
    corpus = Corpus.create(tmp_path / "corpus")
    corpus.append([sample("a", True, "train"), sample("b", True, "train"), sample("c", False, "val"),
                   sample("d", False, "test")], progress=False)
    return tmp_path / "corpus"


def test_info_shows_labelled_counts_per_split_and_finetune_refuses_an_empty_val(train_only_labels: Path,
                                                                               tmp_path: Path) -> None:
    info = CliRunner().invoke(app, ["info", str(train_only_labels)])
    assert "labelled ga per split" in info.output and "train 2 / val 0 / test 0 (none in val, test)" in info.output
    counts = json.loads(CliRunner().invoke(app, ["info", str(train_only_labels), "--json"]).output)
    assert counts["labelled_per_split"]["ga"] == {"train": 2, "val": 0, "test": 0}
    problem = split_shortfall(Corpus.open(train_only_labels).rows, "ga", train_only_labels)
    assert "no val volume labelled 'ga'" in problem and "label volumes of more patients" in problem
    args = ["finetune", "-c", str(ROOT / "jobs" / "finetune_ga.yaml"), "--set", f"data.corpus={train_only_labels}",
            "--set", f"run.storage_path={tmp_path / 'runs'}", "--set", "run.name=r"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "no val volume labelled 'ga'" in " ".join(result.output.split())
    assert not (tmp_path / "runs" / "r").exists()
    dry = CliRunner().invoke(app, [*args, "--dry-run", "--set", "data.crop=[4, 16]", "--set", "scaling.gpus_per_worker=0"])
    assert dry.exit_code == 1 and "no val volume labelled 'ga'" in dry.output.split("cannot run")[-1]


def test_export_model_refuses_a_run_whose_val_split_has_no_labels(train_only_labels: Path, tmp_path: Path) -> None:
    """The bundle claimed "best pooled Dice on the val split (0 volumes)" with threshold 0.5."""
    from octssl.config.job import dump_config, load_config

    run = tmp_path / "run"
    run.mkdir()
    job = load_config(ROOT / "jobs" / "finetune_ga.yaml", [f"data.corpus={train_only_labels}"])
    (run / "config.yaml").write_text(dump_config(job))
    result = CliRunner().invoke(app, ["export-model", str(run), "--task", "ga", "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "no bundle" in result.output and "no val volume labelled 'ga'" in " ".join(
        result.output.split())
    assert not (tmp_path / "b").exists()
