"""Many nodes, simulated: Ray's multi-node test cluster (``ray.cluster_utils.Cluster``) with four worker nodes of
one CPU each, as four KubeRay worker pods would be, plus one standby node (the pod a KubeRay worker group with
one replica to spare, or its autoscaler, brings in). Pretraining runs one DeepSpeed worker per node (gloo), a
node is removed mid-run, and the run resumes from its last checkpoint on the nodes left, on the same
trajectory; a sweep's trials spread over the nodes.

Every node is a raylet on this machine, so gloo talks over loopback: this tests placement, failure and
recovery across nodes, not a network (benchmarks/SCALING.md says what limits it and what the projection to
64 GPUs assumes)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from octssl.config.job import load_config
from octssl.train.launch import run
from octssl.tune.results import ERROR

JOBS = Path(__file__).resolve().parents[2] / "jobs"
NODES = 4
GRID = (16, 64, 64)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """A head with no CPU (nothing but the driver's bookkeeping runs there), four one-CPU worker nodes and a
    one-CPU standby. (Nodes are added here, in the main thread: ``Cluster.add_node`` from another thread while
    a run is in flight did not bring a node up.)"""
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"  # see tests/train/conftest.py
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(NODES + 1):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from octssl.corpus.synth import synthesize

    path = tmp_path_factory.mktemp("multinode") / "corpus"
    synthesize(path, volumes=16, grid=GRID, seed=5, labelled=1.0)
    return path


def _job(corpus: Path, storage: Path, name: str, *extra: str):
    return load_config(JOBS / "pretrain.yaml", [
        f"data.corpus={corpus}", f"run.storage_path={storage}", f"run.name={name}", "data.crop=[16, 64]",
        "data.batch_size=1", "data.crops_per_volume=1", "model.width=0.25", "run.log_every=1",
        "run.max_steps=8", "run.ckpt_every=2", "run.eval_every=100", "optim.name=sgd", "optim.lr=0.01",
        "optim.warmup_steps=0", f"scaling.workers={NODES}", "scaling.cpus_per_worker=1", *extra,
    ])


def _records(run_dir: Path, name: str = "metrics.jsonl") -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def _worker_nodes(cluster) -> dict[int, Any]:
    """Worker node objects by their raylet's pid."""
    return {node.all_processes["raylet"][0].process.pid: node for node in cluster.list_all_nodes() if not node.head}


def _node_of(pid: int, cluster) -> Any:
    """The simulated node whose raylet is an ancestor of process ``pid``."""
    nodes = _worker_nodes(cluster)
    for parent in psutil.Process(pid).parents():
        if parent.pid in nodes:
            return nodes[parent.pid]
    raise AssertionError(f"process {pid} runs under no worker node's raylet")


def _watch_nodes(cluster, root: Path, stop: threading.Event) -> dict[str, Any]:
    """While ``stop`` is unset: the node of every worker whose heartbeat (``workers/rank*.json`` anywhere under
    ``root``) names a live process, keyed by heartbeat file."""
    seen: dict[str, Any] = {}

    def watch() -> None:
        while not stop.is_set():
            for beat_file in root.rglob("workers/rank*.json"):
                if str(beat_file) in seen:
                    continue
                try:
                    seen[str(beat_file)] = _node_of(json.loads(beat_file.read_text())["pid"], cluster).node_id
                except (OSError, ValueError, KeyError, psutil.Error, AssertionError):
                    pass  # not written whole yet, or the worker already ended
            time.sleep(0.1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return seen


def _remove_node_after_checkpoint(cluster, run_dir: Path, rank: int, timeout: float = 400.0) -> dict[str, Any]:
    """Once a checkpoint is registered and ``rank`` has stepped past it, remove the node it runs on (its raylet
    and every process on it), as when a KubeRay worker pod is lost."""
    done: dict[str, Any] = {}

    def watch() -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
                ckpt_step = snapshot["latest_checkpoint_result"]["metrics"]["step"]
                beat = json.loads((run_dir / "workers" / f"rank{rank}.json").read_text())
            except (OSError, json.JSONDecodeError, KeyError, TypeError):
                time.sleep(0.05)
                continue
            if beat["step"] > ckpt_step:
                node = _node_of(beat["pid"], cluster)
                cluster.remove_node(node, allow_graceful=False)
                done.update(removed_at=beat["step"], checkpoint=ckpt_step, node=node.node_id, time=time.time())
                return
            time.sleep(0.05)

    done["thread"] = threading.Thread(target=watch, daemon=True)
    done["thread"].start()
    return done


def test_pretraining_runs_one_worker_per_node_and_survives_a_lost_node(cluster, corpus: Path, tmp_path: Path,
                                                                       record_property) -> None:
    stop = threading.Event()
    nodes = _watch_nodes(cluster, tmp_path / "four-nodes", stop)
    reference = run(_job(corpus, tmp_path, "four-nodes"), progress=False)
    stop.set()
    assert reference.steps == 8 and reference.world_size == NODES
    assert len(nodes) == NODES and len(set(nodes.values())) == NODES, f"workers by node: {nodes}"

    run_dir = tmp_path / "node-lost"
    remover = _remove_node_after_checkpoint(cluster, run_dir, rank=2)
    summary = run(_job(corpus, tmp_path, "node-lost", "scaling.max_failures=2"), progress=False)
    remover["thread"].join(timeout=1)
    assert "removed_at" in remover, "no node was removed mid-run"
    assert remover["removed_at"] < 8 and summary.steps == 8
    got, want = _records(run_dir), _records(tmp_path / "four-nodes")
    assert [r["step"] for r in got] == list(range(1, 9))  # every step once, none lost, none repeated
    for a, b in zip(got, want, strict=True):  # the trajectory of the run that lost no node
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3, abs=1e-4)
    recovered = next(r["time"] for r in got if r["time"] > remover["time"])
    lost = remover["removed_at"] - remover["checkpoint"]
    record_property("node_loss_to_next_step_s", round(recovered - remover["time"], 1))
    print(f"node lost at step {remover['removed_at']} (checkpoint {remover['checkpoint']}): next step "
          f"{recovered - remover['time']:.1f} s later, {lost} step(s) replayed per rank")
    for rank in range(NODES):
        assert [(r["step"], r["ids"]) for r in _records(run_dir, f"samples/rank{rank}.jsonl")] == \
            [(r["step"], r["ids"]) for r in _records(tmp_path / "four-nodes", f"samples/rank{rank}.jsonl")]
    assert remover["node"] not in {n.node_id for n in cluster.list_all_nodes()}  # it ran without the lost node


def test_a_sweep_spreads_its_trials_over_the_nodes(cluster, corpus: Path, tmp_path: Path) -> None:
    from octssl.config.sweep import parse_sweep_config
    from octssl.tune.sweep import run_sweep

    raw = {
        "kind": "sweep", "corpus": str(corpus), "storage_path": str(tmp_path / "sweeps"), "name": "spread",
        "tasks": ["ga"], "fractions": [1.0], "inits": {"scratch": "scratch"}, "seeds": [0, 1],
        "search": {"num_samples": 2, "steps": [4], "grace_steps": 2, "lr": [0.003, 0.01]},
        "resources": {"cpus_per_trial": 1, "max_concurrent_trials": NODES},
        "job": {"data": {"crop": [16, 64], "batch_size": 1, "crops_per_volume": 1, "val_volumes": 2},
                "model": {"width": 0.25}, "optim": {"name": "adamw", "warmup_steps": 0},
                "deepspeed": {"zero_stage": 0}, "run": {"eval_every": 2, "log_every": 1}},
        "figure_volumes": 1,
    }
    stop = threading.Event()
    nodes = _watch_nodes(cluster, tmp_path / "sweeps", stop)
    summary = run_sweep(parse_sweep_config(raw), progress=False)
    stop.set()
    assert sum(summary.trials.values()) == 4 and summary.trials[ERROR] == 0, summary.trials
    assert all(not cell.errors for cell in summary.cells)
    assert len(nodes) >= 3 and len(set(nodes.values())) >= 3, f"trials by node: {nodes}"
