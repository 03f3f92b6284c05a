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
from octssl.ingest.phi import shifted_day

LINE_FILE, CIRCLE_FILE = "Willis_B_716_0.vol", "Willis_B_716_2.vol"


@pytest.fixture(scope="module")
def bundle(finetuned_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model(finetuned_run, "ga", tmp_path_factory.mktemp("bundle") / "ga")


def test_predict_a_corpus_split(bundle: Path, growth_corpus: Path, tmp_path: Path) -> None:
    report = predict(bundle, [growth_corpus], tmp_path / "out", split="test", batch_size=3, progress=False)
    corpus = Corpus.open(growth_corpus)
    test_ids = corpus.ids(split="test", raster_only=False)
    assert sorted(r.id for r in report.rows) == sorted(test_ids)
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
        assert row.area_mm2 is None and row.area_reason.startswith(("line scan", "circle scan"))
        assert row.patient and "Willis" not in row.patient and row.acquired == shifted_day("2017-01-11", row.patient, b"test-key")
        folder = tmp_path / "out" / "volumes" / row.id
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
    assert result.exit_code == 1 and "not a model bundle" in result.output


def test_unreadable_inputs_are_each_reported_and_nothing_predicted_exits_1(bundle: Path, tmp_path: Path,
                                                                           monkeypatch) -> None:
    import os

    monkeypatch.setenv("OCTSSL_PSEUDONYM_KEY", "test-key")
    (tmp_path / "zero.vol").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo.vol")
    (tmp_path / "empty.vol").write_bytes(b"")
    sources = [str(tmp_path / name) for name in ("zero.vol", "fifo.vol", "empty.vol")]
    report = predict(bundle, sources, tmp_path / "out", progress=False)
    assert report.rows == [] and sorted(p for p, _ in report.rejected) == sorted(sources)
    rejects = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()
    assert {r["path"]: r["reason"] for r in rejects} == dict(report.rejected)
    result = CliRunner().invoke(app, ["predict", str(bundle), *sources, "--out", str(tmp_path / "cli")])
    assert result.exit_code == 1, result.output
    output = " ".join(result.output.split())
    assert all(f"rejected {s}" in output for s in sources) and "predicted nothing" in output


def test_an_existing_out_is_refused_or_replaced_whole(bundle: Path, growth_corpus: Path, tmp_path: Path) -> None:
    ids = Corpus.open(growth_corpus).ids(split="test", raster_only=False)
    out = tmp_path / "out"
    predict(bundle, [growth_corpus], out, ids=ids[:2], progress=False)
    with pytest.raises(PredictError, match="already holds a prediction run .*--overwrite"):
        predict(bundle, [growth_corpus], out, ids=ids[2:3], progress=False)
    result = CliRunner().invoke(app, ["predict", str(bundle), str(growth_corpus), "--out", str(out), "--ids", ids[2]])
    assert result.exit_code == 1 and "--overwrite" in result.output
    predict(bundle, [growth_corpus], out, ids=ids[2:3], progress=False, overwrite=True)
    listed = [row["id"] for row in pq.read_table(out / "predictions.parquet").to_pylist()]
    assert listed == [ids[2]] and sorted(p.name for p in (out / "volumes").iterdir()) == listed


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
    assert all(row.area_mm2 is None for row in report.rows)


def test_predict_and_scoring_reproduce_the_bundles_test_metrics(finetuned_run: Path, growth_corpus: Path,
                                                                tmp_path: Path) -> None:
    """The sweep scores the chosen trial's weights on the test split at the threshold chosen on val; a bundle
    of those weights ships that threshold and those numbers, and `predict` on the test split gives them back."""
    from octssl.apply.bundle import SplitMetrics, SweepOrigin, load_bundle
    from octssl.apply.metrics import pooled
    from octssl.models.transfer import read_metadata
    from octssl.tune.evaluate import evaluate_segmentation

    weights = finetuned_run / "best" / "model.safetensors"
    threshold = read_metadata(weights)["card"]["threshold"]
    test_ids = Corpus.open(growth_corpus).ids(split="test", label="ga")
    rows, _ = evaluate_segmentation(str(growth_corpus), str(weights), "ga", test_ids, threshold=threshold)
    origin = SweepOrigin(sweep="sweep", trial="t", cell={}, threshold=threshold,
                         test=SplitMetrics(threshold=threshold, **pooled(rows)))
    bundle = load_bundle(export_model(finetuned_run, "ga", tmp_path / "bundle", origin=origin))
    test = bundle.config.metrics.test
    assert test is not None and test.threshold == bundle.threshold == threshold and test.n == len(test_ids) > 0
    report = predict(bundle.path, [growth_corpus], tmp_path / "out", ids=test_ids, progress=False)
    assert all(r.threshold == test.threshold for r in report.rows) and len(report.rows) == test.n
    assert np.mean([r.dice for r in report.rows]) == pytest.approx(test.dice, abs=1e-6)
    hd = [r.hd95_mm for r in report.rows if r.hd95_mm is not None]
    assert len(report.rows) - len(hd) == test.hd95_undefined
    if hd:
        assert np.mean(hd) == pytest.approx(test.hd95_mm, rel=1e-6)


def test_prediction_rows_say_where_they_came_from(bundle: Path, growth_corpus: Path, tmp_path: Path) -> None:
    from octssl.apply.bundle import load_bundle

    config = load_bundle(bundle).config
    report = predict(bundle, [growth_corpus], tmp_path / "out", split="val", progress=False)
    corpus = Corpus.open(growth_corpus)
    table = pq.read_table(tmp_path / "out" / "predictions.parquet").to_pylist()
    assert len(table) == len(report.rows) > 0
    for row in table:
        assert row["bundle"] == str(bundle) and row["weights_sha256"] == config.provenance["weights_sha256"]
        assert row["threshold"] == config.threshold and row["input_grid"] == "16x64x64"
        assert row["source_sha256"] == corpus.row(row["id"])["source"] and row["source"] == str(growth_corpus)
        assert row["spacing_mm"] == list(corpus.row(row["id"])["spacing_mm"]) and row["schema_version"] == 1
        assert row["warning"] is None  # the training corpus itself is inside what the model saw


def _structured_bundle(finetuned_run: Path, out: Path) -> Path:
    """A bundle whose untrained model's output is spread out (head scaled up), so masks at its threshold are
    partial and depend on the input (an untrained head gives nearly constant probabilities)."""
    import shutil as sh

    import torch

    from octssl.models import save_weights
    from octssl.models.transfer import model_from_weights, read_metadata

    run = out / "run"
    sh.copytree(finetuned_run, run)
    weights = run / "best" / "model.safetensors"
    model = model_from_weights(weights)
    with torch.no_grad():
        model.head.weight.mul_(200.0)
    save_weights(model, weights, {"card": read_metadata(weights)["card"]})
    return export_model(run, "ga", out / "bundle")


def _threshold_at_median(bundle: Path, source: Path, out: Path) -> None:
    """Set the bundle's threshold to the median probability it gives ``source``: its masks there are partial
    whatever the (untrained, order-dependent) model outputs."""
    import json

    import nibabel as nib

    predict(bundle, [source], out, progress=False)
    (prob,) = out.rglob("prob.nii.gz")
    values = np.asarray(nib.load(prob).dataobj, np.float64)
    config = json.loads((bundle / "config.json").read_text())
    config["threshold"] = float(np.clip(np.median(values), 1e-3, 1 - 1e-3))
    assert (values > config["threshold"]).any() and (values <= config["threshold"]).any(), "constant output"
    (bundle / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("source", ["heyex-xml/test_volume", f"heidelberg-vol/{LINE_FILE}"])
def test_one_scan_gives_one_area_from_its_corpus_entry_and_from_its_device_file(
        finetuned_run: Path, shared_dir: Path, tmp_path: Path, monkeypatch, source: str) -> None:
    """Issue 26.2: the same scan predicted from the device file and from its corpus entry gives one area (the
    Predictor puts both on the bundle's grid), and the row says the model saw a grid it was not trained on."""
    from octssl.ingest.pipeline import ingest

    monkeypatch.setenv("OCTSSL_PSEUDONYM_KEY", "test-key")
    path = shared_dir / "data" / source
    bundle = _structured_bundle(finetuned_run, tmp_path)
    _threshold_at_median(bundle, path, tmp_path / "median")
    (device,) = predict(bundle, [path], tmp_path / "device", progress=False).rows
    ingest([path], tmp_path / "corpus", progress=False)
    (entry,) = predict(bundle, [tmp_path / "corpus"], tmp_path / "entry", progress=False).rows
    assert 0 < device.pixels < np.prod([int(n) for n in device.grid.split("x")][::2])  # a partial mask
    assert (entry.pixels, entry.lesions, entry.input_grid) == (device.pixels, device.lesions, device.input_grid)
    if device.raster:
        assert entry.area_mm2 == pytest.approx(device.area_mm2, rel=1e-3) and device.input_grid == "16x64x64"
    assert entry.native_shape == device.native_shape and device.native_shape is not None
    assert device.warning and entry.warning == device.warning  # spacing/pattern outside the training corpus
    assert device.source.startswith(str(path)) and device.source_sha256 == entry.source_sha256
    corpus = Corpus.open(tmp_path / "corpus")  # issue 26.6: the corpus says what the device recorded
    (row,) = corpus.rows
    assert row["native_shape"] == "x".join(map(str, device.native_shape))
    assert row["upsampled"] == device.raster  # the XML's 10x40x50 went onto 49x128x512; a line scan stays native
    assert bool(corpus.summary()["upsampled"]) == device.raster


def test_predict_on_device_files_refuses_another_key_than_the_training_corpus(bundle: Path, shared_dir: Path,
                                                                               tmp_path: Path, monkeypatch) -> None:
    import json

    from octssl.errors import IngestError
    from octssl.ingest.phi import key_fingerprint

    keyed = tmp_path / "keyed"
    shutil.copytree(bundle, keyed)
    config = json.loads((keyed / "config.json").read_text())
    config["provenance"]["key_fingerprint"] = key_fingerprint(b"key-A")  # as a bundle trained on key A's corpus
    (keyed / "config.json").write_text(json.dumps(config))
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(shared_dir / "data" / "heidelberg-vol" / LINE_FILE, src / LINE_FILE)
    monkeypatch.setenv("OCTSSL_PSEUDONYM_KEY", "key-B")
    with pytest.raises(IngestError, match="predict on device files refused: this bundle's training corpus"):
        predict(keyed, [src], tmp_path / "b", progress=False)
    assert not (tmp_path / "b" / "predictions.parquet").exists()
    monkeypatch.setenv("OCTSSL_PSEUDONYM_KEY", "key-A")
    assert len(predict(keyed, [src], tmp_path / "a", progress=False).rows) == 1
