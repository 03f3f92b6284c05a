"""bench_step: the layout rules of the GPU path (checked on CPU), failures kept as rows, a tiny full run."""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import pytest
import torch
from torch import nn

import bench_step
import table

CPU = torch.device("cpu")
TINY = (4, 64, 64)  # the smallest crop the FPN takes: nB % 4, W % 16, D >= 64


def test_check_layout_wants_contiguous_parameters_and_channels_last_inputs() -> None:
    model = nn.Sequential(nn.Conv3d(2, 4, 3))
    volume = torch.randn(1, 2, 4, 8, 8)
    bench_step.check_layout(model, volume.contiguous(memory_format=torch.channels_last_3d), channels_last=True)
    with pytest.raises(ValueError, match="not channels_last_3d"):
        bench_step.check_layout(model, volume, channels_last=True)
    model = model.to(memory_format=torch.channels_last_3d)
    with pytest.raises(ValueError, match="contiguous.*0.weight"):
        bench_step.check_layout(model, volume, channels_last=False)


def test_deepspeed_engine_trains_on_channels_last_inputs_with_contiguous_parameters() -> None:
    """The GPU path's layout (channels_last_3d batch, contiguous parameters) through DeepSpeed, on CPU."""
    cfg = bench_step.StepConfig("octssl", "tuned", "deepspeed", "fp32", True, False, False, 1)
    step, keep = bench_step.build_step(cfg, CPU, TINY)
    engine, batch = keep
    assert batch["oct"].is_contiguous(memory_format=torch.channels_last_3d)
    before = [p.detach().clone() for p in engine.module.parameters()]
    step()
    step()
    assert all(p.is_contiguous() for p in engine.module.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, engine.module.parameters(), strict=True))


def test_a_failing_configuration_is_a_failed_row() -> None:
    cfg = bench_step.StepConfig("octssl", "tuned", "deepspeed", "fp16", False, False, False, 1)
    row = bench_step.run_config(cfg, CPU, TINY, gflop=1.0, warmup=1, repeats=1, inner=1)
    assert row["status"] == "failed" and "fp16" in row["error"] and "volumes_per_s" not in row


def test_tiny_run_writes_every_planned_row_and_the_policy_check(tmp_path) -> None:
    out = tmp_path / "step-cpu-test.json"
    bench_step.main(["--device", "cpu", "--crop", "4x64x64", "--warmup", "1", "--repeats", "1",
                     "--only", "paper", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["label"] for r in rows] == [c.label for c in bench_step.plan(CPU, 1, False)]
    ran = [r for r in rows if r["name"] == "paper"]  # the DeepSpeed rows: the test above and the slow one below
    assert len(ran) == 2 and all(r["status"] == "ok" for r in ran)
    assert all(r["status"] == "skipped" and "not selected" in r["error"] for r in rows if r not in ran)
    paper = next(r for r in ran if r["role"] == "baseline" and not r["checkpointing"])
    assert paper["ratio_to_paper"] == pytest.approx(1.0)
    for r in ran:
        assert r["volumes_per_s"] > 0 and r["peak_mib"] > 0 and r["model_tflop_per_s"] > 0
        assert r["seconds_per_step"]["n"] == 1 and r["precision"] == "fp32"
    assert result["policy"]["auto"] == {"precision": "fp32", "channels_last": False}
    assert result["env"]["torch"] == torch.__version__ and "load_average_end" in result["env"]
    assert out.with_suffix(".png").stat().st_size > 1000
    rows = table.table(tmp_path)
    assert "step: FPN 4x64x64" in rows and out.name in rows


def _row(name: str, batch: int, vol_s: float, *, compiled: bool = False, ckpt: bool = False) -> dict:
    cfg = bench_step.StepConfig(name, "tuned", "deepspeed", "bf16", True, compiled, ckpt, batch)
    return {**asdict(cfg), "status": "ok", "volumes_per_s": vol_s}


def test_gpu_batch_sweep_doubles_the_eager_path_and_compiles_once_at_its_best_batch() -> None:
    rows = [_row("octssl", 8, 90.0), _row("octssl+compile", 8, 120.0, compiled=True)]
    sweep = bench_step.batch_sweep(rows, base=8, max_batch=64)
    assert [(c.batch, c.checkpointing, c.compile) for c in sweep] == [
        (16, False, False), (32, False, False), (64, False, False), (16, True, False), (32, True, False),
        (64, True, False)]
    rows += [_row("octssl", 16, 110.0), _row("octssl", 32, 125.0), _row("octssl", 64, 118.0)]
    again = bench_step.compile_at_best_batch(rows, base=8)
    assert again is not None and again.compile and again.batch == 32 and again.name == "octssl+compile"
    rows[1]["volumes_per_s"] = 80.0  # compiling lost at the base batch: not tried again
    assert bench_step.compile_at_best_batch(rows, base=8) is None


def test_half_precision_rows_are_skipped_with_the_reason_on_a_cpu_without_native_bf16(monkeypatch) -> None:
    monkeypatch.setattr(bench_step, "_cpu_bf16", lambda: False)
    result = bench_step.run(CPU, TINY, batch=1, warmup=1, repeats=1, inner=1, max_batch=0, compile_gpu=False,
                            budget_s=60, only={"plain bf16 default", "plain bf16 cl"})
    half = [r for r in result["rows"] if r["precision"] == "bf16"]
    assert [r["label"] for r in half] == ["plain bf16 default b1", "plain bf16 cl b1"]
    assert all(r["status"] == "skipped" and "without native bf16" in r["error"] for r in half)
    fp32 = bench_step.StepConfig("paper", "baseline", "plain", "fp32", False, False, False, 1)
    assert bench_step.unsupported(fp32, CPU) is None


def test_a_row_is_bounded_by_the_time_left() -> None:
    """The watchdog stops a running row between two PyTorch calls; the repeats are cut to what fits."""
    start = time.monotonic()
    with pytest.raises(bench_step.OutOfTime):
        with bench_step.time_limit(start + 0.3):
            while True:
                torch.ones(64).add_(1)
    assert time.monotonic() - start < 2.0
    assert bench_step.repeats_that_fit(first_step_s=10, warmup=1, repeats=2, inner=1, left_s=35) == 2
    assert bench_step.repeats_that_fit(first_step_s=10, warmup=1, repeats=5, inner=1, left_s=35) == 2
    assert bench_step.repeats_that_fit(first_step_s=10, warmup=0, repeats=2, inner=1, left_s=8) == 0
    cfg = bench_step.StepConfig("paper", "baseline", "plain", "fp32", False, False, False, 1)
    row = bench_step.run_config(cfg, CPU, TINY, gflop=1.0, warmup=1, repeats=1, inner=1,
                                deadline=time.monotonic() - 1)
    assert row["status"] == "skipped" and "time budget" in row["error"] and "volumes_per_s" not in row


def test_a_row_is_not_started_when_earlier_rows_say_it_cannot_finish() -> None:
    cfg = bench_step.StepConfig("octssl", "tuned", "deepspeed", "fp32", False, False, False, 1)
    earlier = [{"status": "ok", "batch": 1, "row_s": 40.0}, {"status": "ok", "batch": 1, "row_s": 50.0}]
    reason = bench_step.over_budget(cfg, earlier, time.monotonic() + 30, budget_s=100)
    assert reason is not None and "~40 s" in reason
    assert bench_step.over_budget(cfg, earlier, time.monotonic() + 45, budget_s=100) is None
    assert "spent" in bench_step.over_budget(cfg, [], time.monotonic() - 1, budget_s=100)
