"""bench_scaling: the projection's all-reduce arithmetic, scaling efficiencies, and (slow) the Ray runs."""

from __future__ import annotations

import json

import pytest

import bench_scaling


def test_projection_follows_the_ring_all_reduce_model() -> None:
    grad = 4_369_553 * 4
    rows = {r["gpus"]: r for r in bench_scaling.projection(0.1, 8, grad, 1e6, 200.0)}  # 200 vol/s per worker
    assert set(rows) == {8, 64, 512}
    # 64 GPUs on 400 Gb/s InfiniBand: 2*63/64 of the gradient through each GPU, plus 126 hops of 5 us.
    expected = (2 * 63 / 64 * grad / 50e9 + 126 * 5e-6) * 1e3
    assert rows[64]["allreduce_ms_ib_400Gbps_ring"] == pytest.approx(expected)
    assert rows[64]["allreduce_ms_ib_100Gbps_ring"] > rows[64]["allreduce_ms_ib_400Gbps_ring"]
    assert rows[512]["allreduce_ms_ib_400Gbps_tree"] < rows[512]["allreduce_ms_ib_400Gbps_ring"]
    # 8 volumes of 1 MB every 0.1 s = 80 volumes/s = 80 MB/s per GPU: 0.4 loader workers at 200 volumes/s.
    assert rows[8]["data_mb_s_per_gpu"] == pytest.approx(80.0)
    assert rows[512]["data_gb_s_total"] == pytest.approx(80.0 * 512 / 1e3)
    assert rows[8]["loader_workers_per_gpu"] == pytest.approx(0.4)


def test_efficiencies_compare_against_one_worker() -> None:
    phases = [
        {"setup": "1 worker", "batch_per_worker": 2, "global_batch": 2, "volumes_per_s": 10.0},
        {"setup": "2 workers, 1 node", "batch_per_worker": 2, "global_batch": 4, "volumes_per_s": 16.0},
        {"setup": "2 workers, 1 node", "batch_per_worker": 1, "global_batch": 2, "volumes_per_s": 12.0},
    ]
    eff = bench_scaling.efficiencies(phases, batch=2)
    assert eff["2 workers, 1 node"] == {"weak_efficiency": pytest.approx(0.8), "strong_efficiency": pytest.approx(0.6)}
    assert eff["2 workers, 2 nodes (simulated)"] == {"weak_efficiency": None, "strong_efficiency": None}


@pytest.mark.slow
def test_one_and_two_workers_and_two_simulated_nodes(tmp_path) -> None:
    out = tmp_path / "scaling.json"
    bench_scaling.main(["--crop", "4x64x64", "--steps", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    setups = {(p["setup"], p["batch_per_worker"]): p for p in result["phases"]}
    assert set(setups) == {("1 worker", 2), ("2 workers, 1 node", 2), ("2 workers, 1 node", 1),
                           ("2 workers, 2 nodes (simulated)", 2), ("2 workers, 2 nodes (simulated)", 1)}
    assert setups[("2 workers, 2 nodes (simulated)", 2)]["nodes"] == 2
    assert setups[("2 workers, 1 node", 2)]["nodes"] == 1
    for p in result["phases"]:
        assert p["grad_mb"] == pytest.approx(4_369_553 * 4 / 1e6)  # width 1: the paper's parameters
        assert p["compute_s"] > 0 and p["allreduce_s"] > 0 and p["torch_threads"] == 1
    assert all(v is not None for e in result["efficiency"].values() for v in e.values())
