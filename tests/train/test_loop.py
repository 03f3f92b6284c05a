"""The one train loop in a single process: outputs, resume per ZeRO stage, NaN policy, transfer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from octssl.train.engine import lr_factor
from octssl.train.launch import run_single_process
from octssl.train.loop import FAULT_NAN_STEPS, NonFiniteLossError


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_outputs_of_a_run(job) -> None:
    config = job("pretrain.yaml", "run.name=outputs", "run.eval_every=3")
    summary = run_single_process(config)
    run_dir = Path(config.run.storage_path) / "outputs"
    assert summary.steps == 6 and summary.skipped_steps == 0
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert set(on_disk) >= {"schema_version", "steps", "first_loss", "final_loss", "best_metric", "weights", "wall_s"}
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    for r in records:
        assert set(r) >= {"step", "loss", "lr", "samples_per_s", "data_wait_s", "step_s"}
        assert r["samples_per_s"] > 0 and r["step_s"] >= r["data_wait_s"] >= 0
    assert (run_dir / "config.yaml").read_text().count("reconstruction") == 1
    card = json.loads((run_dir / "final" / "model.json").read_text())
    assert card["model"] == "fpn" and card["objective"]["target"] == "faf"
    assert (run_dir / "final" / "model.safetensors").stat().st_size > 10_000
    assert (run_dir / "best" / "model.safetensors").exists()  # val ran at steps 3 and 6
    assert 0 < summary.best_metric <= 1  # SSIM
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step00000003", "step00000006"]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_each_zero_stage_saves_and_resumes_on_the_same_trajectory(job, stage: int) -> None:
    full = job("pretrain.yaml", f"run.name=full{stage}", f"deepspeed.zero_stage={stage}")
    run_single_process(full)
    full_dir = Path(full.run.storage_path) / f"full{stage}"
    resumed = job("pretrain.yaml", f"run.name=resumed{stage}", f"deepspeed.zero_stage={stage}")
    summary = run_single_process(resumed, resume_from=full_dir / "checkpoints" / "step00000003")
    resumed_dir = Path(resumed.run.storage_path) / f"resumed{stage}"
    assert summary.steps == 6
    reference, continued = _losses(full_dir), _losses(resumed_dir)
    assert sorted(continued) == [4, 5, 6]  # steps 1-3 came from the checkpoint, not replayed
    for step in (4, 5, 6):
        assert continued[step] == pytest.approx(reference[step], rel=1e-4, abs=1e-5)
    samples = lambda d: (d / "samples" / "rank0.jsonl").read_text().splitlines()  # noqa: E731
    assert samples(resumed_dir) == samples(full_dir)[3:]  # the same crops, none twice, none skipped


def test_nonfinite_loss_is_skipped_and_counted(job, monkeypatch) -> None:
    clean = run_single_process(job("pretrain.yaml", "run.name=clean", "run.log_every=1", "optim.schedule=cosine"))
    monkeypatch.setenv(FAULT_NAN_STEPS, "2")
    summary = run_single_process(job("pretrain.yaml", "run.name=nan1", "run.log_every=1", "optim.schedule=cosine"))
    assert summary.steps == 6 and summary.skipped_steps == 1
    assert summary.final_loss is not None and math.isfinite(summary.final_loss)  # training went on
    # A skipped step still advances the LR schedule: the rates match the clean run's step for step.
    lrs = lambda s: [json.loads(line)["lr"] for line in (Path(s.weights).parents[1] / "metrics.jsonl")  # noqa: E731
                     .read_text().splitlines()]
    assert lrs(summary) == pytest.approx(lrs(clean)) and len(lrs(summary)) == 6


def test_too_many_nonfinite_losses_stop_the_run(job, monkeypatch) -> None:
    monkeypatch.setenv(FAULT_NAN_STEPS, "2,3,4")
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses at step 4"):
        run_single_process(job("pretrain.yaml", "run.name=nan3", "run.max_bad_steps=3"))


def test_finetune_from_pretrained_beats_frozen_random(job, train_corpus: Path) -> None:
    """Fine-tuning (here from SSL weights) must beat the untrained network it starts from."""
    from octssl.data.sources import ZarrSource
    from octssl.data.transforms import EvalTransform, collate
    from octssl.models import build_model
    from octssl.train.objectives import build_objective

    pre = job("pretrain.yaml", "run.name=pre", "run.max_steps=8")
    weights = run_single_process(pre).weights
    fine = job(
        "finetune_ga.yaml", "run.name=ft", f"run.init={weights}", "run.max_steps=30", "run.eval_every=30",
        "objective.label_fraction=1.0", "data.val_volumes=100", "optim.lr=0.01",
    )
    summary = run_single_process(fine)
    tuned = summary.best_metric
    # the threshold chosen on val with the best checkpoint travels with its weights (and into a bundle)
    from octssl.models.transfer import read_metadata

    card = read_metadata(summary.best_weights)["card"]
    assert summary.best_threshold is not None and card["threshold"] == summary.best_threshold
    assert card["val"]["dice_pooled"] == tuned and card["val_volumes"] > 0 and summary.best_step == 30
    data = card["training_data"]  # what a bundle's model card reports
    assert data["volumes"] > 0 and 0 < data["patients"] <= data["volumes"] and sum(data["devices"].values()) == data["volumes"]

    torch.manual_seed(0)
    random_model = build_model("fpn", width=0.25).eval()
    objective = build_objective("segmentation", target="ga")
    val = ZarrSource(train_corpus, split="val", require=("oct", "ga"), transform=EvalTransform(targets=("ga",)))
    with torch.no_grad():
        dices = [objective.per_volume(random_model(b["oct"]), b)[0]["dice"] for b in (collate([s]) for s in val)]
    frozen = sum(dices) / len(dices)
    assert tuned > frozen + 0.1, (tuned, frozen)


def test_loop_updates_prometheus_metrics_and_tensorboard(job, monkeypatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from octssl.observe.metrics import TrainMetrics

    monkeypatch.setenv(FAULT_NAN_STEPS, "2")
    config = job("pretrain.yaml", "run.name=metrics-run", "run.log_every=2", "run.eval_every=3")
    summary = run_single_process(config)
    values = TrainMetrics(rank=0, run="metrics-run").values()
    assert values["octssl_steps_total"] == 6
    assert values["octssl_samples_total"] == 6 * 2  # batch size 2
    assert values["octssl_skipped_steps_total"] == 1
    assert values["octssl_checkpoint_duration_seconds_count"] == 2
    assert values["octssl_last_checkpoint_timestamp_seconds"] > summary.wall_s
    assert values["octssl_loss"] == pytest.approx(summary.final_loss)
    assert values["octssl_step_duration_seconds_count"] == 6
    assert (values["octssl_step_duration_seconds_sum"] >= values["octssl_step_local_seconds_sum"]
            >= values["octssl_data_wait_seconds_sum"] > 0)
    assert values["octssl_step"] == values["octssl_total_steps"] == 6
    # the last step's rate is the planned one (a skipped step does not make the schedule lag)
    planned = config.optim.lr * lr_factor(6, 6, config.optim.warmup_steps, config.optim.schedule)
    assert values["octssl_learning_rate"] == pytest.approx(planned, abs=1e-12)
    assert values["octssl_grad_norm"] > 0
    assert values["octssl_memory_bytes{kind=host_rss}"] > 1e6
    assert values["octssl_validation{metric=ssim}"] == pytest.approx(summary.val["ssim"])

    board = Path(summary.weights).parents[1] / "tensorboard"
    events = EventAccumulator(str(board), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    for name in ("loss", "lr", "samples_per_s", "data_wait_s", "step_s", "grad_norm"):
        assert f"train/{name}" in tags["scalars"], tags
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]
    assert events.Scalars("train/loss")[-1].value == pytest.approx(summary.final_loss, rel=1e-5)
    assert [e.step for e in events.Scalars("val/ssim")] == [3, 6]
    images = [t for t in tags["images"] if t.startswith("reconstruction/")]
    assert len(images) == 2, tags["images"]
    first = events.Images(images[0])
    assert [e.step for e in first] == [3, 6] and first[0].height == 2 * 16 and first[0].width == 64
