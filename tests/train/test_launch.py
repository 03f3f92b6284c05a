"""The launcher under a real local Ray: 2 DeepSpeed workers, a worker killed mid-run, preflight errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from octssl.errors import ConfigError, ModelError
from octssl.train.launch import preflight, run
from octssl.train.summary import read_run_summary

from ..conftest import kill_after_checkpoint


def _records(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]




# eval_every=6 with 3 val volumes on 2 ranks: an odd split, which under ZeRO-3 hangs unless every rank
# runs the same number of forwards.
TWO_WORKERS = (
    "scaling.workers=2", "run.max_steps=12", "run.ckpt_every=3", "optim.lr=0.01", "optim.name=sgd",
    "run.eval_every=6", "data.val_volumes=3",
)


@pytest.fixture(scope="module")
def reference(local_ray, train_corpus: Path, tmp_path_factory):
    """``reference(stage)``: the RUN_DIR of an uninterrupted 2-worker run at that ZeRO stage (run once)."""
    from octssl.config.job import load_config

    from .conftest import JOBS

    storage = tmp_path_factory.mktemp("runs")
    done: dict[int, Path] = {}

    def get(stage: int) -> Path:
        if stage not in done:
            config = load_config(JOBS / "pretrain.yaml", [
                f"data.corpus={train_corpus}", f"run.storage_path={storage}", "data.crop=[16, 64]",
                "data.batch_size=2", "data.crops_per_volume=2", "model.width=0.25", "run.log_every=1",
                f"run.name=full{stage}", "optim.warmup_steps=0", f"deepspeed.zero_stage={stage}", *TWO_WORKERS,
            ])
            run(config, progress=False)
            done[stage] = storage / f"full{stage}"
        return done[stage]

    return get


def test_two_workers_train_and_report(reference) -> None:
    uninterrupted = reference(1)
    summary = read_run_summary((uninterrupted / "summary.json").read_text())
    assert summary.steps == 12 and summary.world_size == 2 and summary.schema_version == 1
    losses = [r["loss"] for r in _records(uninterrupted)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # loss decreases
    steps = [len(_records(uninterrupted, f"samples/rank{r}.jsonl")) for r in (0, 1)]
    assert steps == [12, 12]  # every rank ran the same number of steps
    assert [r["step"] for r in _records(uninterrupted, "val.jsonl")] == [6, 12]
    ckpts = sorted(p for p in uninterrupted.glob("checkpoint_*") if p.is_dir())
    assert len(ckpts) == 2  # keep_last=2 of the 4 reported
    assert {p.name for p in ckpts[-1].glob("trainer_rank*.json")} == {"trainer_rank0.json", "trainer_rank1.json"}


@pytest.mark.parametrize(
    "stage", [pytest.param(0, marks=pytest.mark.slow), 1, pytest.param(2, marks=pytest.mark.slow), 3]
)
def test_killed_worker_resumes_from_checkpoint_without_losing_or_repeating_samples(reference, job, stage) -> None:
    uninterrupted = reference(stage)
    config = job(
        "pretrain.yaml", f"run.name=killed{stage}", "scaling.max_failures=1", f"deepspeed.zero_stage={stage}",
        *TWO_WORKERS,
    )
    run_dir = Path(config.run.storage_path) / f"killed{stage}"
    killer = kill_after_checkpoint(run_dir, run_dir, rank=1)
    summary = run(config, progress=False)
    killer["thread"].join(timeout=1)
    assert killer.get("killed_at", 99) < 12, "the worker was never killed mid-run"
    assert summary.steps == 12
    beats = [json.loads(p.read_text()) for p in (run_dir / "workers").glob("rank*.json")]
    assert all(b["step"] == 12 for b in beats)
    for rank in (0, 1):  # after resume, the sample log is exactly the uninterrupted run's
        got = _records(run_dir, f"samples/rank{rank}.jsonl")
        want = _records(uninterrupted, f"samples/rank{rank}.jsonl")
        assert [(r["step"], r["ids"]) for r in got] == [(r["step"], r["ids"]) for r in want]
    got, want = _records(run_dir), _records(uninterrupted)
    assert [r["step"] for r in got] == list(range(1, 13))
    for a, b in zip(got, want, strict=True):  # the same loss trajectory as the uninterrupted run
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3, abs=1e-4)
    assert [r["step"] for r in _records(run_dir, "val.jsonl")] == [6, 12]  # no duplicate after the replay


def test_bad_configs_fail_before_any_worker_starts(job, local_ray) -> None:
    with pytest.raises(ModelError, match="W=40 must be a multiple of 16"):
        preflight(job("pretrain.yaml", "data.crop=[16, 40]"))
    with pytest.raises(ConfigError, match="needs a GPU"):
        preflight(job("pretrain.yaml", "deepspeed.precision=fp16"))
    t0 = time.time()
    with pytest.raises(ConfigError, match="cluster has 2 CPU"):
        run(job("pretrain.yaml", "scaling.workers=3"), progress=False)
    assert time.time() - t0 < 30
    with pytest.raises(ConfigError, match="no such weights file"):
        preflight(job("finetune_ga.yaml", "run.init=/nonexistent/model.safetensors"))


def test_existing_run_is_not_silently_resumed(job, reference) -> None:
    config = job("pretrain.yaml", "run.name=full1")
    config.run.storage_path = str(reference(1).parent)
    with pytest.raises(ConfigError, match="already exists: pass --resume"):
        run(config, progress=False)


def test_an_en_face_crop_below_the_ssim_window_fails_preflight(job) -> None:
    """Reconstruction scores SSIM in 11x11 windows: a smaller crop is refused before any worker starts
    (it used to fail after the workers' start-up)."""
    with pytest.raises(ConfigError, match=r"data.crop=\(8, 64\).*11x11 SSIM window"):
        preflight(job("pretrain.yaml", "data.crop=[8, 64]"))
    preflight(job("finetune_ga.yaml", "data.crop=[8, 64]"))  # segmentation has no window


def test_relative_data_paths_become_absolute_for_the_workers(job, train_corpus: Path, monkeypatch) -> None:
    """Ray workers do not start in the caller's directory: a run reads its local paths absolute."""
    from octssl.train.launch import name_run

    monkeypatch.chdir(train_corpus.parent)
    named = name_run(job("pretrain.yaml", f"data.corpus={train_corpus.name}", "data.shards=shards"), resume=False)
    assert named.data.corpus == str(train_corpus) and named.data.shards == str(train_corpus.parent / "shards")
    remote = name_run(job("pretrain.yaml", "data.shards=s3://bucket/shards"), resume=False)
    assert remote.data.shards == "s3://bucket/shards"
