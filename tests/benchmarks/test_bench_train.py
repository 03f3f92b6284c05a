"""bench_train: steady-state arithmetic, the per-step extras profile, and (slow) the four-arm run."""

from __future__ import annotations

import json

import pytest

import bench_train


def test_steady_state_uses_the_windows_after_warm_up() -> None:
    # Steps 5..20 logged every 5 steps; 0.5 s per step after step 10, slower before (start-up).
    times = {5: 10.0, 10: 12.0, 15: 14.5, 20: 17.0}
    s = bench_train.steady(times, warm_steps=10, window=5)
    assert s["from_step"] == 10 and s["to_step"] == 20
    assert s["seconds_per_step"] == pytest.approx(0.5) and s["steps_per_s"] == pytest.approx(2.0)
    assert s["windows"]["n"] == 2 and s["windows"]["spread"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="too few logged steps"):
        bench_train.steady(times, warm_steps=20, window=5)


def test_profile_of_the_loops_per_step_extras(tmp_path) -> None:
    extras = bench_train.profile_extras(tmp_path, n=20)
    assert set(extras) == {"samples_jsonl_append_ms", "heartbeat_write_ms", "metrics_update_ms_per_log_step",
                           "metrics_observe_ms_per_step"}
    assert all(0 < v < 1000 for v in extras.values())
    assert len((tmp_path / "profile-samples.jsonl").read_text().splitlines()) == 20


@pytest.mark.slow
def test_five_arms_with_ray_write_the_overhead(tmp_path) -> None:
    out = tmp_path / "train.json"
    bench_train.main(["--steps", "15", "--warm-steps", "5", "--volumes", "6", "--width", "0.25", "--batch", "2",
                      "--repeats", "2", "--profile", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [a["arm"].split()[0] for a in result["arms"]] == ["plain", "trainer", "plain", "ray", "plain"]
    for arm in result["arms"]:
        assert arm["steps_per_s"] > 0 and arm["from_step"] == 5 and arm["to_step"] == 15
    ray = result["arms"][3]
    assert ray["ray_init_s"] > 0 and ray["startup_s"] > 0
    assert result["overhead"] == pytest.approx(ray["overhead_vs_bracket"]) and ray["bracket_drift"] >= 0
    assert result["profile"]["step_no_data"]["deepspeed_s"] > 0
