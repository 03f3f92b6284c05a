"""Pretraining fed from s3:// shards with run.storage_path on s3://: a killed worker resumes from the
checkpoint on S3, and fine-tuning starts from the s3:// weights it published."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from octssl.config.job import load_config
from octssl.storage.location import Location, staging_dir
from octssl.train.launch import run
from octssl.webds.export import export_shards

from ..conftest import kill_after_checkpoint

JOBS = Path(__file__).resolve().parents[2] / "jobs"
GRID = (16, 64, 64)




@pytest.mark.slow
def test_pretrain_from_s3_resumes_after_killed_worker_then_finetune_from_s3_weights(
        s3_ray, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    from octssl.corpus.synth import synthesize

    monkeypatch.setenv("OCTSSL_STAGING", str(tmp_path_factory.mktemp("staging")))
    corpus = tmp_path_factory.mktemp("s3train") / "corpus"
    synthesize(corpus, volumes=20, grid=GRID, seed=3, labelled=1.0)
    base = f"s3://{s3_ray.bucket}/train-{os.getpid()}"
    export_shards(corpus, f"{base}/shards", samples_per_shard=4, progress=False)
    common = [f"data.corpus={corpus}", f"run.storage_path={base}/runs", "data.crop=[16, 64]", "data.batch_size=2",
              "model.width=0.25", "run.log_every=1", "optim.warmup_steps=0", "data.val_volumes=3"]
    config = load_config(JOBS / "pretrain.yaml", [
        *common, "data.source=stream", f"data.shards={base}/shards", "run.name=pre", "scaling.workers=2",
        "scaling.max_failures=1", "run.max_steps=12", "run.ckpt_every=3", "run.eval_every=6",
    ])
    remote_run = Location.parse(f"{base}/runs/pre")
    killer = kill_after_checkpoint(remote_run, staging_dir(remote_run), rank=1, timeout=300.0, poll=0.05)
    summary = run(config, progress=False)
    killer["thread"].join(timeout=1)
    assert killer.get("killed_at", 99) < 12, "the worker was never killed mid-run"
    assert summary.steps == 12 and summary.weights.startswith(f"{base}/runs/pre/")
    names = {loc.path[len(remote_run.path) + 1:] for loc in remote_run.files()}
    assert {"summary.json", "config.yaml", "metrics.jsonl", "samples/rank0.jsonl", "samples/rank1.jsonl"} <= names
    assert any(n.startswith("checkpoint_") for n in names), names  # Ray Train's checkpoints live on S3
    steps = [json.loads(line)["step"] for line in (remote_run / "metrics.jsonl").read_bytes().decode().splitlines()]
    assert steps == list(range(1, 13))  # resumed: no step lost or repeated
    assert Location.parse(summary.weights).is_file()

    finetune = load_config(JOBS / "finetune_ga.yaml", [
        *common, "run.name=ft", f"run.init={summary.weights}", "run.init_scope=encoder", "scaling.workers=1",
        "run.max_steps=3", "run.ckpt_every=3", "run.eval_every=3",
    ])
    tuned = run(finetune, progress=False)
    assert tuned.steps == 3 and Location.parse(f"{base}/runs/ft/summary.json").is_file()
