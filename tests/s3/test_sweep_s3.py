"""A sweep whose storage_path is on S3, on a published corpus: Tune's state there, every output uploaded to
SWEEP_DIR, nothing local left behind; its summary, bundle and report read back from S3. Weights on S3 as
a sweep init pass its preflight; missing ones are named."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from octssl.apply.bundle import load_bundle
from octssl.cli import app
from octssl.config.sweep import parse_sweep_config
from octssl.corpus.publish import publish
from octssl.errors import ConfigError
from octssl.storage.location import Location, staging_dir
from octssl.tune.summary import read_sweep_summary
from octssl.tune.sweep import preflight_sweep, run_sweep, sweep_dir_of

GRID = (16, 64, 64)  # the smallest grid the fpn accepts


def _raw(corpus: str, storage: str) -> dict:
    """A tiny sweep: GA at fraction 1 from scratch, one trial of 6 steps."""
    return {
        "kind": "sweep", "corpus": corpus, "storage_path": storage, "name": "s", "tasks": ["ga"],
        "fractions": [1.0], "inits": {"scratch": "scratch"}, "seeds": [0],
        "search": {"num_samples": 1, "steps": [6], "grace_steps": 3, "lr": [0.003, 0.01]},
        "job": {"data": {"crop": [16, 64], "batch_size": 2, "crops_per_volume": 2, "val_volumes": 4},
                "model": {"width": 0.25}, "optim": {"name": "adamw", "warmup_steps": 0},
                "deepspeed": {"zero_stage": 0}, "run": {"eval_every": 3, "log_every": 1}},
        "figure_volumes": 2,
    }


@pytest.fixture(scope="module")
def published_corpus(s3_ray, tmp_path_factory: pytest.TempPathFactory) -> str:
    from octssl.corpus.synth import synthesize

    corpus = tmp_path_factory.mktemp("sweep-s3") / "corpus"
    synthesize(corpus, volumes=20, grid=GRID, seed=3, labelled=1.0)
    url = f"s3://{s3_ray.bucket}/sweep-corpus-{os.getpid()}"
    publish(corpus, url, progress=False)
    return url


def test_sweep_with_storage_on_s3(published_corpus: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OCTSSL_STAGING", str(tmp_path / "staging"))
    monkeypatch.chdir(tmp_path)
    storage = published_corpus.replace("sweep-corpus-", "sweep-")
    summary = run_sweep(parse_sweep_config(_raw(published_corpus, storage)), progress=False)
    url = f"{storage}/s"
    place = Location.parse(url)
    assert summary.sweep_dir == url and summary.trials["ok"] == 1 and summary.corpus == published_corpus
    assert read_sweep_summary((place / "summary.json").read_bytes()) == summary
    names = {f.path[len(place.path) + 1:] for f in place.files()}
    assert summary.cells[0].best_config is not None
    trial = summary.cells[0].best_config.trial
    assert {"sweep.yaml", "trials.parquet", "results.parquet", "report.md", "dice_vs_fraction.png",
            "figures/segmentations.npz", "bundles/ga/config.json", "bundles/ga/model.safetensors",
            f"trials/{trial}/val.jsonl", f"trials/{trial}/best/model.safetensors"} <= names, sorted(names)
    assert any(n.startswith("tune/") for n in names), sorted(names)  # Ray Tune's experiment state, on S3
    assert not staging_dir(place).exists() and not (tmp_path / "s3:").exists()
    trials = pq.read_table((place / "trials.parquet").download(tmp_path / "trials.parquet")).to_pylist()
    assert trials[0]["best_weights"] == f"{url}/trials/{trial}/best/model.safetensors"

    assert summary.bundles == {"ga": f"{url}/bundles/ga"}
    bundle = load_bundle(summary.bundles["ga"])
    assert bundle.config.provenance["sweep"] == url and bundle.config.provenance["trial"] == trial
    result = CliRunner().invoke(app, ["export-model", url, "--task", "ga", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert load_bundle(tmp_path / "b").config.provenance["weights_sha256"] == \
        bundle.config.provenance["weights_sha256"]
    result = CliRunner().invoke(app, ["report", url])
    assert result.exit_code == 0 and f"wrote {url}/report.md" in result.output, result.output


def test_sweep_inits_on_s3_pass_preflight_and_missing_ones_are_named(published_corpus: str, s3_ray,
                                                                    tmp_path: Path) -> None:
    import torch

    from octssl.models import build_model
    from octssl.models.transfer import save_weights

    torch.manual_seed(0)
    weights = f"{published_corpus}-ssl/model.safetensors"
    save_weights(build_model("fpn", width=0.25), weights, {"card": {"objective": {"kind": "reconstruction",
                                                                                 "target": "faf"}}})
    raw = _raw(published_corpus, str(tmp_path / "sweeps"))
    config, place, _ = sweep_dir_of(parse_sweep_config({**raw, "inits": {"scratch": "scratch", "ssl": weights}}))
    assert config.inits["ssl"] == weights and config.corpus == published_corpus  # URLs are not made local paths
    assert not place.remote and preflight_sweep(config)["test"]["ga"]
    missing = f"{published_corpus}-ssl/none.safetensors"
    config, _, _ = sweep_dir_of(parse_sweep_config({**raw, "inits": {"ssl": missing}}))
    with pytest.raises(ConfigError, match=f"inits.ssl: {missing}: no such weights file"):
        preflight_sweep(config)


def test_upload_tree_puts_the_last_patterns_after_everything_else(s3: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from octssl.storage.location import upload_tree

    for name in ("summary.json", "bundles/ga/config.json", "bundles/ga/model.safetensors", "trials/t/val.jsonl",
                 "report.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    order: list[str] = []
    real = Location.upload

    def recording(self: Location, source: str | Path) -> None:
        real(self, source)
        order.append(Path(source).relative_to(tmp_path).as_posix())

    monkeypatch.setattr(Location, "upload", recording)
    upload_tree(tmp_path, s3, last=("bundles/*/config.json", "summary.json"))
    assert order[-2:] == ["bundles/ga/config.json", "summary.json"] and len(order) == 5
    assert (Location.parse(s3) / "trials/t/val.jsonl").read_bytes() == b"trials/t/val.jsonl"
