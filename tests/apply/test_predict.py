"""`octssl predict`: a bundle on a corpus split and on real device files; rows, PNGs, refusals; end to end."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from octssl.apply.bundle import export_model
from octssl.apply.predict import COLUMNS, predict
from octssl.cli import app
from octssl.corpus.store import Corpus
from octssl.errors import PredictError

LINE_FILE, CIRCLE_FILE = "Willis_B_716_0.vol", "Willis_B_716_2.vol"


@pytest.fixture(scope="module")
def bundle(finetuned_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model(finetuned_run, "ga", tmp_path_factory.mktemp("bundle") / "ga")


def test_predict_a_corpus_split(bundle: Path, growth_corpus: Path, tmp_path: Path) -> None:
    report = predict(bundle, [growth_corpus], tmp_path / "out", split="test", batch_size=3, progress=False)
    corpus = Corpus.open(growth_corpus)
    test_ids = corpus.ids(split="test", raster_only=False)
    assert sorted(r["id"] for r in report.rows) == sorted(test_ids)
    table = pq.read_table(tmp_path / "out" / "predictions.parquet")
    assert table.column_names == list(COLUMNS) and table.num_rows == len(test_ids)
    csv_lines = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert csv_lines[0] == ",".join(COLUMNS) and len(csv_lines) == len(test_ids) + 1
    for row in table.to_pylist():
        sample = corpus.read(row["id"])
        mask = np.asarray(Image.open(tmp_path / "out" / "volumes" / row["id"] / "mask_grid.png")) > 0
        assert mask.shape == sample["ga"].shape and row["pixels"] == mask.sum()
        spacing = sample["meta"]["spacing_mm"]
        assert row["area_mm2"] == pytest.approx(mask.sum() * spacing[0] * spacing[2])
        truth = sample["ga"] > 0
        expected = 1.0 if not (mask.any() or truth.any()) else 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
        assert row["dice"] == pytest.approx(expected)
        assert row["acquired"] == sample["meta"]["acquired"] and row["split"] == "test"
        assert Image.open(tmp_path / "out" / "volumes" / row["id"] / "overlay.png").mode == "RGB"


def test_predict_a_split_of_an_icechunk_snapshot_like_the_local_corpus(bundle: Path, growth_corpus: Path,
                                                                        tmp_path: Path) -> None:
    from octssl.corpus.icechunk import publish

    snapshot = publish(growth_corpus, tmp_path / "repo", progress=False)["snapshot_id"]
    local = predict(bundle, [growth_corpus], tmp_path / "local", split="test", batch_size=3, progress=False)
    result = CliRunner().invoke(app, ["predict", str(bundle), f"{tmp_path / 'repo'}@{snapshot}", "--split", "test",
                                      "--out", str(tmp_path / "ice")])
    assert result.exit_code == 0, result.output
    ice = pq.read_table(tmp_path / "ice" / "predictions.parquet").to_pylist()
    assert len(ice) == len(local.rows) > 0 and all(row.pop("source").endswith(f"@{snapshot}") for row in ice)
    assert ice == [{k: v for k, v in row.items() if k != "source"}
                   for row in pq.read_table(tmp_path / "local" / "predictions.parquet").to_pylist()]


def test_predict_device_files_gives_masks_but_no_area_for_line_and_circle(bundle: Path, shared_dir: Path,
                                                                         tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OCTSSL_PSEUDONYM_KEY", "test-key")
    src = tmp_path / "src"
    src.mkdir()
    for name in (LINE_FILE, CIRCLE_FILE, "invalid.vol"):
        shutil.copyfile(shared_dir / "data" / "heidelberg-vol" / name, src / name)
    report = predict(bundle, [src], tmp_path / "out", progress=False)
    assert len(report.rows) == 2 and [p for p, _ in report.rejected] == [str(src / "invalid.vol")]
    for row in report.rows:
        assert row["area_mm2"] is None and row["area_reason"].startswith(("line scan", "circle scan"))
        assert row["patient"] and "Willis" not in row["patient"] and row["acquired"] == "2017-01-11"
        folder = tmp_path / "out" / "volumes" / row["id"]
        assert np.asarray(Image.open(folder / "mask_grid.png")).shape == (1, 768)  # the data: one pixel per A-scan
        assert np.asarray(Image.open(folder / "mask.png")).shape == (48, 512)  # the picture: a readable band
        assert Image.open(folder / "overlay.png").size == (768, 768)  # drawn over the native localizer
    assert not any(src.glob("*.parquet")) and not (src / "volumes.zarr").exists()  # no corpus written


def test_predict_refusals(bundle: Path, growth_corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(PredictError, match="--split/--ids select volumes of a corpus"):
        predict(bundle, [tmp_path], tmp_path / "o", split="test", progress=False)
    with pytest.raises(PredictError, match="no volume"):
        predict(bundle, [growth_corpus], tmp_path / "o", ids=["nope"], progress=False)
    result = CliRunner().invoke(app, ["predict", str(tmp_path), str(growth_corpus), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "not a model bundle" in result.output


@pytest.mark.slow
def test_end_to_end_train_export_predict_growth(finetuned_run: Path, growth_corpus: Path, tmp_path: Path) -> None:
    """A real fine-tuning run, its bundle from the CLI, predict on the corpus and growth on the predictions."""
    from octssl.config.job import load_config
    from octssl.train.launch import run_single_process

    job = load_config(finetuned_run / "config.yaml", [f"run.storage_path={tmp_path / 'runs'}", "run.name=ga"])
    run_single_process(job)
    runner = CliRunner()
    result = runner.invoke(app, ["export-model", str(tmp_path / "runs" / "ga"), "--task", "ga", "--out",
                                 str(tmp_path / "bundle")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["predict", str(tmp_path / "bundle"), str(growth_corpus), "--out",
                                 str(tmp_path / "pred")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["growth", str(tmp_path / "pred"), "--out", str(tmp_path / "growth")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "growth" / "growth.csv").is_file() and (tmp_path / "growth" / "summary.json").is_file()


@pytest.mark.slow
def test_device_files_as_ray_tasks_when_a_cluster_is_running(bundle: Path, shared_dir: Path, tmp_path: Path,
                                                             monkeypatch) -> None:
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("OCTSSL_PSEUDONYM_KEY", "test-key")
    src = shared_dir / "data" / "heidelberg-vol"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        report = predict(bundle, [src / LINE_FILE, src / CIRCLE_FILE], tmp_path / "out", progress=False)
    finally:
        ray.shutdown()
    assert report.executor == "ray" and len(report.rows) == 2
    assert all(row["area_mm2"] is None for row in report.rows)
