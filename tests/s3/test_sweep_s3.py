"""A sweep whose storage_path is on S3: Tune's state there, every output uploaded to SWEEP_DIR, nothing local
left behind; its summary, bundle and report read back from S3."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from octssl.cli import app
from octssl.models import load_bundle
from octssl.storage import Location, staging_dir
from octssl.tune.config import parse_sweep_config
from octssl.tune.sweep import run_sweep

GRID = (16, 64, 64)  # the smallest grid the fpn accepts


def test_sweep_with_storage_on_s3(s3_ray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from octssl.corpus.synth import synthesize

    monkeypatch.setenv("OCTSSL_STAGING", str(tmp_path / "staging"))
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus"
    synthesize(corpus, volumes=20, grid=GRID, seed=3, labelled=1.0)
    storage = f"s3://{s3_ray.bucket}/sweep-{os.getpid()}"
    raw = {
        "kind": "sweep", "corpus": str(corpus), "storage_path": storage, "name": "s", "tasks": ["ga"],
        "fractions": [1.0], "inits": {"scratch": "scratch"}, "seeds": [0],
        "search": {"num_samples": 1, "steps": [6], "grace_steps": 3, "lr": [0.003, 0.01]},
        "job": {"data": {"crop": [16, 64], "batch_size": 2, "crops_per_volume": 2, "val_volumes": 4},
                "model": {"width": 0.25}, "optim": {"name": "adamw", "warmup_steps": 0},
                "deepspeed": {"zero_stage": 0}, "run": {"eval_every": 3, "log_every": 1}},
        "figure_volumes": 2,
    }
    summary = run_sweep(parse_sweep_config(raw), progress=False)
    url = f"{storage}/s"
    place = Location.parse(url)
    assert summary["sweep_dir"] == url and summary["trials"]["ok"] == 1
    assert json.loads((place / "summary.json").read_bytes()) == summary
    names = {f.path[len(place.path) + 1:] for f in place.files()}
    trial = summary["cells"][0]["best_config"]["trial"]
    assert {"sweep.yaml", "trials.parquet", "results.parquet", "report.md", "dice_vs_fraction.png",
            "figures/segmentations.npz", "bundles/ga/config.json", "bundles/ga/model.safetensors",
            f"trials/{trial}/val.jsonl", f"trials/{trial}/best/model.safetensors"} <= names, sorted(names)
    assert any(n.startswith("tune/") for n in names), sorted(names)  # Ray Tune's experiment state, on S3
    assert not staging_dir(place).exists() and not (tmp_path / "s3:").exists()
    trials = pq.read_table((place / "trials.parquet").download(tmp_path / "trials.parquet")).to_pylist()
    assert trials[0]["best_weights"] == f"{url}/trials/{trial}/best/model.safetensors"

    assert summary["bundles"] == {"ga": f"{url}/bundles/ga"}
    bundle = load_bundle(summary["bundles"]["ga"])
    assert bundle.config["provenance"]["sweep"] == url and bundle.config["provenance"]["trial"] == trial
    result = CliRunner().invoke(app, ["export-model", url, "--task", "ga", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert load_bundle(tmp_path / "b").config["provenance"]["weights_sha256"] == \
        bundle.config["provenance"]["weights_sha256"]
    result = CliRunner().invoke(app, ["report", url])
    assert result.exit_code == 0 and f"wrote {url}/report.md" in result.output, result.output
