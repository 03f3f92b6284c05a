"""Model bundles: export from a run or a sweep, load, and every refusal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from octssl import __version__
from octssl.apply.bundle import FORMAT_VERSION, export_model, load_bundle
from octssl.errors import ModelError
from octssl.models.transfer import model_from_weights, read_metadata
from octssl.tune.bundles import export_sweep, write_sweep_bundles
from octssl.tune.summary import SweepSummary


@pytest.fixture(scope="module")
def bundle(finetuned_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model(finetuned_run, "ga", tmp_path_factory.mktemp("bundle") / "ga")


def test_bundle_holds_weights_config_threshold_and_provenance(bundle: Path, finetuned_run: Path) -> None:
    assert sorted(p.name for p in bundle.iterdir()) == ["config.json", "model.onnx", "model.safetensors",
                                                        "model.torchscript.pt"]
    config = json.loads((bundle / "config.json").read_text())
    assert config["octssl_version"] == __version__ and config["task"] == "ga"
    assert config["model"]["name"] == "fpn" and config["model"]["options"]["width"] == 0.25
    assert config["input"]["grid"] == [16, 64, 64] and config["input"]["multiple"] == 16
    card = read_metadata(finetuned_run / "best" / "model.safetensors")["card"]
    assert config["threshold"] == card["threshold"] and 0 < config["threshold"] < 1  # chosen once, in training
    assert config["metrics"]["val"]["n"] == card["val_volumes"] > 0
    assert config["metrics"]["val"]["dice_pooled"] == card["val"]["dice_pooled"]
    assert config["format"] == "octssl-bundle" and config["format_version"] == FORMAT_VERSION
    assert config["provenance"]["training_config"]["objective"]["target"] == "ga"
    assert len(config["provenance"]["corpus_manifest_sha256"]) == 64
    loaded = load_bundle(bundle)
    reference = model_from_weights(finetuned_run / "best" / "model.safetensors").eval()
    x = torch.randn(1, 1, 16, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), reference(x))


def _copy(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    return copy


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(format_version="2.0"), r"bundle format 2\.0, this octssl .* reads format 1\.x"),
    (lambda c: c.update(format_version="one"), "is not major.minor"),
    (lambda c: c.update(format="something/9"), "is not 'octssl-bundle'"),
    (lambda c: c["model"]["options"].update(width=0.5), "differs from the weights'"),
    (lambda c: c["provenance"].update(weights_sha256="0" * 64), "sha256 differs"),
    (lambda c: c.update(threshold=1.5), "threshold 1.5"),
    (lambda c: c.update(task="drusen"), "task 'drusen'"),
])
def test_a_changed_bundle_is_refused(bundle: Path, tmp_path: Path, change, message: str) -> None:
    copy = _copy(bundle, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    change(config)
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=message):
        load_bundle(copy)


@pytest.mark.parametrize("change", [
    lambda c: c.update(format_version="1.9", octssl_version="0.0.1", added_in_1_9={"x": 1}),  # another minor
    lambda c: (c.pop("format_version"), c.update(format="octssl-bundle/1")),  # written before format_version
])
def test_a_bundle_of_the_same_format_major_loads_in_any_octssl(bundle: Path, tmp_path: Path, change) -> None:
    copy = _copy(bundle, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    change(config)
    (copy / "config.json").write_text(json.dumps(config))
    loaded = load_bundle(copy)
    assert loaded.threshold == config["threshold"] and loaded.grid == (16, 64, 64)


def test_export_needs_no_corpus_and_refuses_weights_without_a_val_threshold(finetuned_run: Path,
                                                                           tmp_path: Path) -> None:
    from octssl.models.transfer import save_weights

    run = tmp_path / "run"
    shutil.copytree(finetuned_run, run)
    corpus = tmp_path / "moved-away"  # the training corpus is not there any more
    text = (run / "config.yaml").read_text().replace(str(read_metadata(run / "best" / "model.safetensors")
                                                         ["card"]["corpus_version"]["corpus"]), str(corpus))
    (run / "config.yaml").write_text(text)
    assert load_bundle(export_model(run, "ga", tmp_path / "b1")).threshold > 0
    card = read_metadata(run / "best" / "model.safetensors")["card"]
    card.pop("threshold")
    save_weights(model_from_weights(run / "best" / "model.safetensors"), run / "best" / "model.safetensors",
                 {"card": card})
    with pytest.raises(ModelError, match="records no threshold chosen on the val split"):
        export_model(run, "ga", tmp_path / "b2")


def test_other_refusals(bundle: Path, finetuned_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a model bundle"):
        load_bundle(tmp_path)
    copy = _copy(bundle, tmp_path)
    (copy / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_bundle(copy)
    with pytest.raises(ModelError, match="not segmentation of 'rpd'"):
        export_model(finetuned_run, "rpd", tmp_path / "rpd")
    with pytest.raises(ModelError, match="already there"):
        export_model(finetuned_run, "ga", bundle)
    with pytest.raises(ModelError, match="no best/ or final/"):
        export_model(tmp_path, "ga", tmp_path / "x")


def test_sweep_directory_bundles_its_best_cell(finetuned_run: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    (sweep / "trials").mkdir(parents=True)
    shutil.copytree(finetuned_run, sweep / "trials" / "t-best")
    threshold = read_metadata(finetuned_run / "best" / "model.safetensors")["card"]["threshold"]
    cell = {"task": "ga", "fraction": 1.0, "init": "scratch", "model": "fpn", "dice_mean": 0.4, "hd95_mean": 1.0,
            "n_test": 4, "n_seeds": 1, "n_train_patients": 3, "n_train_volumes": 6}
    chosen = {"seed": 0, "lr": 0.01, "weight_decay": 0.0, "steps": 6}
    best_test = {"trial": "t-best", "threshold": threshold, "dice": 0.45, "dice_pooled": 0.5, "hd95_mm": 1.0,
                 "hd95_undefined": 0, "n": 4}
    summary = {"cells": [
        {**cell, "fraction": 0.1, "best_config": {**chosen, "trial": "t-worse", "val_dice_pooled": 0.1,
                                                  "threshold": 0.5}},
        {**cell, "best_config": {**chosen, "trial": "t-best", "val_dice_pooled": 0.3, "threshold": threshold},
         "best_test": best_test},
        {**cell, "task": "rpd", "best_config": None},
    ]}
    made = write_sweep_bundles(sweep, SweepSummary.model_validate({**summary, "tasks": ["ga", "rpd"]}))  # as the sweep calls it: before summary.json
    assert made["ga"] == str(sweep / "bundles" / "ga") and made["rpd"].startswith("error:")
    (sweep / "summary.json").write_text(json.dumps(summary))  # and from the command line, after the sweep
    export_sweep(sweep, "ga", tmp_path / "cli-bundle")
    for bundle in (sweep / "bundles" / "ga", tmp_path / "cli-bundle"):
        config = load_bundle(bundle).config
        assert config.provenance["trial"] == "t-best" and config.threshold == threshold
        test = config.metrics.test
        assert test is not None and (test.dice, test.dice_pooled, test.threshold) == (0.45, 0.5, threshold)
    summary["cells"][1]["best_config"]["threshold"] = 0.95 if threshold != 0.95 else 0.05
    (sweep / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ModelError, match="the sweep recorded threshold"):
        export_sweep(sweep, "ga", tmp_path / "cli-bundle", overwrite=True)


def test_the_bundle_has_a_model_card(bundle: Path, finetuned_run: Path) -> None:
    card = load_bundle(bundle).config.card
    assert card is not None and "geographic atrophy" in card.intended_use and "Not a medical device" in card.intended_use
    data = card.training_data
    job_fraction = yaml.safe_load((finetuned_run / "config.yaml").read_text())["objective"]["label_fraction"]
    assert data.task == "ga" and data.grids == ["16x64x64"] and data.label_fraction == job_fraction
    assert (data.volumes, data.patients, data.devices) == (6, 3, {"synthetic": 6})  # from the weights' card
    assert data.spacing_mm is None or set(data.spacing_mm) == {"min", "max"}
    threshold = load_bundle(bundle).threshold
    assert f"threshold {threshold}" in card.metrics and "val (" in card.metrics
    assert len(card.limitations) >= 3 and any("raster" in line for line in card.limitations)
