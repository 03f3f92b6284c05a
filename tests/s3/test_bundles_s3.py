"""Model bundles on S3: export-model from and to s3:// (config.json last), load_bundle and predict from a URL,
bad URLs refused in one line; `octssl report` and export-model on a sweep directory held on S3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from octssl.apply.bundle import CONFIG_NAME, WEIGHTS_NAME, export_model, load_bundle
from octssl.cli import app
from octssl.corpus import publish as pub
from octssl.corpus.store import Corpus
from octssl.errors import ModelError
from octssl.storage.location import Location, upload_tree


def _one_line_error(result, *needles: str) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


def test_export_from_an_s3_run_to_an_s3_bundle_then_predict_from_it(finetuned_run: Path, growth_corpus: Path,
                                                                     s3: str, tmp_path: Path) -> None:
    run_url, bundle_url = f"{s3}/runs/ga", f"{s3}/bundles/ga"
    upload_tree(finetuned_run, run_url)  # a run whose run.storage_path was on S3 leaves these files there
    result = CliRunner().invoke(app, ["export-model", run_url, "--task", "ga", "--out", bundle_url])
    assert result.exit_code == 0 and f"wrote {bundle_url}" in result.output, result.output
    bundle = Location.parse(bundle_url)
    assert {f.name for f in bundle.files()} == {CONFIG_NAME, WEIGHTS_NAME, "model.torchscript.pt", "model.onnx"}
    config = json.loads((bundle / CONFIG_NAME).read_bytes())
    assert config["provenance"]["run_dir"] == run_url and config["task"] == "ga"
    local = load_bundle(export_model(finetuned_run, "ga", tmp_path / "local"))
    loaded = load_bundle(bundle_url)
    assert loaded.path == bundle and loaded.threshold == local.threshold and loaded.grid == local.grid
    assert loaded.config.provenance["weights_sha256"] == local.config.provenance["weights_sha256"]

    out = tmp_path / "pred"
    result = CliRunner().invoke(app, ["predict", bundle_url, str(growth_corpus), "--split", "test", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out / "predictions.parquet").to_pylist()
    test_ids = Corpus.open(growth_corpus).ids(split="test", raster_only=False)
    assert sorted(r["id"] for r in rows) == sorted(test_ids) and {r["threshold"] for r in rows} == {loaded.threshold}
    assert all((out / "volumes" / i / "mask.png").is_file() for i in test_ids)
    # the ONNX export is fetched from the bundle's URL and gives the same masks
    result = CliRunner().invoke(app, ["predict", bundle_url, str(growth_corpus), "--split", "test", "--runtime", "onnx",
                                      "--out", str(tmp_path / "onnx")])
    assert result.exit_code == 0, result.output
    onnx_rows = pq.read_table(tmp_path / "onnx" / "predictions.parquet").to_pylist()
    assert [r["pixels"] for r in onnx_rows] == [r["pixels"] for r in rows]
    _one_line_error(CliRunner().invoke(app, ["predict", bundle_url, str(growth_corpus), "--out", f"{s3}/out"]),
                    f"{s3}/out", "not a URL")  # predictions are written to a local folder, never to "s3:/..."


def test_predict_from_an_s3_bundle_on_a_published_corpus(finetuned_run: Path, growth_corpus: Path, s3: str,
                                                         tmp_path: Path) -> None:
    bundle_url = str(export_model(finetuned_run, "ga", f"{s3}/bundle"))
    pub.publish(growth_corpus, f"{s3}/corpus", progress=False)
    local = CliRunner().invoke(app, ["predict", bundle_url, str(growth_corpus), "--split", "val",
                                     "--out", str(tmp_path / "a")])
    remote = CliRunner().invoke(app, ["predict", bundle_url, f"{s3}/corpus", "--split", "val",
                                      "--out", str(tmp_path / "b")])
    assert local.exit_code == 0 and remote.exit_code == 0, local.output + remote.output
    a, b = (pq.read_table(tmp_path / x / "predictions.parquet").to_pylist() for x in "ab")
    assert [r["pixels"] for r in a] == [r["pixels"] for r in b] and len(a) > 0
    assert {r["source"] for r in b} == {f"{s3}/corpus"}


def test_an_interrupted_upload_leaves_no_bundle(finetuned_run: Path, s3: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"{s3}/bundle"
    export_model(finetuned_run, "ga", url)

    def failing(self: Location, source: str | Path) -> None:
        raise OSError("connection reset (simulated)")

    monkeypatch.setattr(Location, "upload", failing)  # the weights' upload fails while replacing the bundle
    with pytest.raises(OSError, match="simulated"):
        export_model(finetuned_run, "ga", url, overwrite=True)
    assert not (Location.parse(url) / CONFIG_NAME).exists()  # config.json goes first and comes back last
    with pytest.raises(ModelError, match=f"{url}: not a model bundle"):
        load_bundle(url)


def test_bad_bundle_urls_are_refused_in_one_line(finetuned_run: Path, growth_corpus: Path, s3: str,
                                                 tmp_path: Path) -> None:
    empty = f"{s3}/nothing"
    _one_line_error(CliRunner().invoke(app, ["predict", empty, str(growth_corpus), "--out", str(tmp_path / "o")]),
                    empty, "not a model bundle")
    _one_line_error(CliRunner().invoke(app, ["export-model", empty, "--task", "ga", "--out", str(tmp_path / "b")]),
                    empty, "no such run or sweep directory")
    Location.parse(f"{s3}/half/{WEIGHTS_NAME}").upload(finetuned_run / "best" / WEIGHTS_NAME)  # weights alone
    _one_line_error(CliRunner().invoke(app, ["predict", f"{s3}/half", str(growth_corpus), "--out", str(tmp_path / "o")]),
                    f"{s3}/half", "needs config.json")
    _one_line_error(CliRunner().invoke(app, ["predict", "s3://no-such-bucket-octssl/b", str(growth_corpus),
                                             "--out", str(tmp_path / "o")]), "no-such-bucket-octssl")


def _fake_sweep(finetuned_run: Path, root: Path) -> Path:
    """A finished sweep directory as run_sweep leaves it, its one trial being ``finetuned_run``."""
    from octssl.models.transfer import read_metadata

    sweep = root / "sweep"
    shutil.copytree(finetuned_run, sweep / "trials" / "t-best")
    threshold = read_metadata(finetuned_run / "best" / WEIGHTS_NAME)["card"]["threshold"]  # the trial's val choice
    cell = {"task": "ga", "fraction": 1.0, "init": "scratch", "model": "fpn", "dice_mean": 0.4, "dice_std": 0.1,
            "dice_seed_std": None, "dice_seeds": [0.4], "hd95_mean": 1.0, "hd95_undefined": 0, "n_test": 4,
            "n_seeds": 1, "n_train_patients": 3, "n_train_volumes": 6, "trials": 1, "trials_failed": 0,
            "trials_stopped": 0, "errors": [], "dice_lesion_mean": None, "healthy_predicted_empty": None,
            "n_test_healthy": 0,
            "best_config": {"trial": "t-best", "seed": 0, "lr": 0.01, "weight_decay": 0.0, "steps": 6, "val_dice_pooled": 0.3, "threshold": threshold},
            "best_test": {"trial": "t-best", "threshold": threshold, "dice": 0.4, "dice_pooled": 0.45, "hd95_mm": 1.0,
                          "n": 4}}
    summary = {"name": "sweep", "corpus": "c", "tasks": ["ga"], "fractions": [1.0], "inits": {"scratch": "scratch"},
               "models": ["fpn"], "seeds": [0], "num_samples": 1, "search": "random", "cells": [cell],
               "trials": {"ok": 1, "stopped": 0, "error": 0}, "timings_s": {"total": 1.0}}
    (sweep / "summary.json").write_text(json.dumps(summary))
    pq.write_table(pa.Table.from_pylist([{"trial": "t-best", "status": "ok"}]),
                   sweep / "trials.parquet")
    pq.write_table(pa.Table.from_pylist(
        [{"task": "ga", "fraction": 1.0, "init": "scratch", "model": "fpn", "seed": 0, "trial": "t-best", "id": "v",
          "dice": 0.4, "hd95_mm": 1.0, "truth_px": 3, "pred_px": 2}]), sweep / "results.parquet")
    return sweep


def test_report_and_export_model_on_a_sweep_directory_on_s3(finetuned_run: Path, s3: str, tmp_path: Path) -> None:
    sweep_url = f"{s3}/sweeps/sweep"
    upload_tree(_fake_sweep(finetuned_run, tmp_path), sweep_url)
    result = CliRunner().invoke(app, ["report", sweep_url])
    assert result.exit_code == 0 and f"wrote {sweep_url}/report.md" in result.output, result.output
    report = (Location.parse(sweep_url) / "report.md").read_bytes().decode()
    assert report.startswith("# Label-efficiency sweep `sweep`") and "40.0 ± 10.0" in report
    assert (Location.parse(sweep_url) / "dice_vs_fraction.png").read_bytes().startswith(b"\x89PNG")

    result = CliRunner().invoke(app, ["export-model", sweep_url, "--task", "ga", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    config = load_bundle(tmp_path / "b").config
    assert config.provenance["sweep"] == sweep_url and config.provenance["trial"] == "t-best"
    assert config.provenance["run_dir"] == f"{sweep_url}/trials/t-best"
    assert config.metrics.test is not None and config.metrics.test.dice == 0.4  # the trial's own, at its threshold
    assert config.metrics.test.threshold == config.threshold
    _one_line_error(CliRunner().invoke(app, ["report", f"{s3}/sweeps/none"]), f"{s3}/sweeps/none",
                    "not a finished sweep directory")
