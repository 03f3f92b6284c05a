"""bench_levers and gpu.sh smoke: every row is written whatever happens to the others, within its bound."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench_levers
import table

GPU_SH = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.sh"
NAMES = [r.name for r in bench_levers.ROWS]


def test_the_levers_of_the_issue_each_have_a_row() -> None:
    rows = {r.name: r for r in bench_levers.ROWS}
    assert rows["paper"].precision == "fp32" and rows["paper"].layout == "default"
    assert rows["octssl"].engine == "deepspeed" and rows["octssl"].precision == "auto"
    assert rows["compile"].compile == "max-autotune-no-cudagraphs" and rows["cuda-graph"].cuda_graph
    assert {rows["octssl"].zero_stage, rows["octssl-zero0"].zero_stage} == {0, 1}
    assert rows["octssl-torch-autocast"].autocast == "torch" and rows["cl-model-pinned"].data == "pinned"
    assert [r.batch for r in bench_levers.ROWS if r.name.startswith("octssl-b")] == [32, 64, 128]
    assert len(NAMES) == len(set(NAMES))


def test_channels_last_network_keeps_each_weight_in_its_ranks_layout() -> None:
    from octssl.models import build_model

    model = bench_levers.channels_last_network(build_model("fpn", width=0.25))
    for p in model.parameters():
        if p.dim() == 5:
            assert p.is_contiguous(memory_format=torch.channels_last_3d)
        elif p.dim() == 4:
            assert p.is_contiguous(memory_format=torch.channels_last)
    logits = model(torch.randn(1, 1, 4, 64, 64).contiguous(memory_format=torch.channels_last_3d))
    assert logits.shape == (1, 1, 4, 64)


def test_a_spent_budget_skips_every_row_and_still_writes_them(tmp_path) -> None:
    out = tmp_path / "levers.json"
    assert bench_levers.main(["--smoke", "--budget-s", "0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["name"] for r in result["rows"]] == NAMES
    assert all(r["status"] == "skipped" and r["error"] == "time budget spent" for r in result["rows"])
    assert result["best"] is None and result["octssl_default_ratio"] is None and result["smoke"] is True


def test_gpu_sh_smoke_writes_every_row_when_rows_crash_hang_or_need_cuda(tmp_path) -> None:
    only = "paper,octssl,bf16,cl-input,cuda-graph,octssl-b32"
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(GPU_SH), "smoke", "--only", only, "--budget-s", "400",
                           "--fault", "bf16=crash", "--fault", "cl-input=hang", "--bound", "cl-input=2"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "levers-smoke.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == NAMES
    assert rows["bf16"]["status"] == "failed" and "worker died" in rows["bf16"]["error"]
    assert rows["cl-input"]["status"] == "timed out" and "bound 2 s" in rows["cl-input"]["error"]
    assert rows["cuda-graph"]["status"] == "skipped" and rows["cuda-graph"]["error"] == "needs CUDA"
    for name in ("paper", "octssl", "octssl-b32"):  # each after a fresh worker replaced the dead or stuck one
        assert rows[name]["status"] == "ok", rows[name].get("error")
        assert rows[name]["volumes_per_s"] > 0 and rows[name]["peak_mib"] > 0
    assert rows["paper"]["ratio_to_paper"] == pytest.approx(1.0) and result["octssl_default_ratio"] > 0
    assert rows["octssl"]["engine"] == "deepspeed" and rows["octssl"]["precision"] == "fp32"  # auto on CPU
    assert all(rows[n]["status"] == "skipped" and "not selected" in rows[n]["error"] for n in NAMES
               if n not in only.split(","))
    assert (tmp_path / "levers-smoke.png").stat().st_size > 1000
    (tmp_path / "levers-cuda-test.json").write_text(json.dumps(result | {"smoke": False}))
    rows = table.table(tmp_path)  # a run's file is a row of the benchmarks table
    assert "levers (smoke): FPN 4x64x64" in rows and "levers: FPN 4x64x64" in rows and "octssl default x" in rows
