"""Timing helpers: repeats and spread, peak memory, environment record, result names."""

from __future__ import annotations

import pytest
import torch

import common


def test_summarize_reports_median_and_spread() -> None:
    s = common.summarize([1.0, 3.0, 2.0, 10.0])
    assert s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 10.0 and s["n"] == 4
    assert s["spread"] == pytest.approx(9.0 / 2.5)


def test_time_repeats_runs_warmup_then_repeats_of_inner_calls() -> None:
    calls = []
    timing = common.time_repeats(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeats=3, inner=4)
    assert len(calls) == 2 + 3 * 4
    assert timing["n"] == 3 and 0 <= timing["min"] <= timing["median"] <= timing["max"]


def test_peak_memory_sees_a_large_cpu_allocation() -> None:
    with common.PeakMemory(torch.device("cpu"), interval=0.001) as peak:
        block = torch.ones(64 * 2**20)  # 256 MiB, touched
        assert float(block[-1]) == 1.0
        del block
    assert peak.peak_bytes >= 200 * 2**20
    assert peak.what == "rss_rise_sampled"


def test_environment_names_device_versions_and_load() -> None:
    env = common.finish(common.environment(torch.device("cpu")))
    assert env["torch"] == torch.__version__
    assert env["deepspeed"] and env["ray"]  # installed in the project's venv
    assert env["cudnn"] is None and env["device"].endswith("cores)")
    assert len(env["load_average_start"]) == 3 and len(env["load_average_end"]) == 3


def test_result_names_carry_the_device(tmp_path) -> None:
    path = common.result_path("step", torch.device("cpu"), out_dir=tmp_path)
    assert path.parent == tmp_path and path.name.startswith("step-cpu-") and path.suffix == ".json"
    assert " " not in path.name
