"""Scaling benchmark: Ray Train with 1 and 2 workers, and on a simulated two-node cluster; compute vs all-reduce.

    python benchmarks/bench_scaling.py [--crop 8x64x64] [--batch 2] [--steps 4] [--width 1.0]

Each run is a TorchTrainer (gloo, one CPU and one torch thread per worker) whose workers train the FPN at
full width (so the gradient is the real 4.37M parameters x 4 B) on a small crop, two ways per phase:
- ``deepspeed``: octssl's engine (ZeRO-1, fp32) steps: the platform's throughput per worker;
- ``decomposed``: the same model in plain PyTorch, each step split into compute (forward + backward),
  wait (a barrier: the time the faster rank idles for the slower one, i.e. stragglers) and the all-reduce
  of the flattened gradient bytes on the gloo group (what data parallelism must move per step), then SGD.
Phases: per-worker batch ``B`` (weak scaling: 1 vs 2 workers at B each) and, with 2 workers, ``B/2`` each
(strong scaling: the same global batch B). Runs: 1 worker; 2 workers on this node; 2 workers on
``ray.cluster_utils.Cluster`` with two nodes of one CPU each (both nodes are processes on this machine, so
gloo still talks over loopback: it shows Ray's placement across nodes, not a network).
Also prints the projection to 8, 64 and 512 GPUs used in benchmarks/SCALING.md (:func:`projection`).
Writes ``benchmarks/results/scaling-<device>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import common

HERE = Path(__file__).resolve().parent
FPN_PARAMS = 4_369_553


def _step_times(fn: Any, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def scaling_worker(cfg: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: the timed phases, gathered to rank 0 and reported."""
    import ray.train
    import torch.distributed as dist

    from octssl.config.job import load_config
    from octssl.models import build_model
    from octssl.models.precision import resolve_precision
    from octssl.train.engine import build_engine
    from octssl.train.objectives import build_objective

    torch.set_num_threads(cfg["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    crop = tuple(cfg["crop"])
    objective = build_objective("segmentation", target="ga")
    torch.manual_seed(0)
    job = load_config(None, ["data.corpus=synthetic", "optim.name=sgd", "optim.grad_clip=0", "deepspeed.zero_stage=1",
                             "deepspeed.precision=fp32", f"data.batch_size={max(cfg['batches'])}"])
    engine, _ = build_engine(build_model("fpn", width=cfg["width"]), job, 10**6, resolve_precision("fp32", gpu=False))
    model = build_model("fpn", width=cfg["width"]).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    params = [p for p in model.parameters() if p.requires_grad]
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    rows = []
    for batch_size in cfg["batches"]:
        gen = torch.Generator().manual_seed(rank)
        batch = {"oct": torch.randn(batch_size, 1, *crop, generator=gen),
                 "ga": (torch.rand(batch_size, 1, crop[0], crop[2], generator=gen) > 0.7).float(),
                 "id": [str(i) for i in range(batch_size)]}

        def ds_step(batch: dict[str, Any] = batch) -> None:
            engine.backward(objective.loss(engine(batch["oct"]), batch))
            engine.step()

        dist.barrier()
        ds_times = _step_times(ds_step, cfg["warmup"], cfg["steps"])
        parts: dict[str, list[float]] = {"compute_s": [], "wait_s": [], "allreduce_s": [], "optimizer_s": []}

        def decomposed_step(batch: dict[str, Any] = batch, parts: dict[str, list[float]] = parts) -> None:
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=False)
            objective.loss(model(batch["oct"]), batch).backward()
            t1 = time.perf_counter()
            dist.barrier()
            t2 = time.perf_counter()
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            flat /= world
            t3 = time.perf_counter()
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset: offset + p.numel()].view_as(p))
                offset += p.numel()
            optimizer.step()
            t4 = time.perf_counter()
            for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                parts[key].append(value)

        dist.barrier()
        _step_times(decomposed_step, cfg["warmup"], cfg["steps"])
        for values in parts.values():
            del values[: cfg["warmup"]]
        rows.append({
            "rank": rank, "world_size": world, "node": ray.get_runtime_context().get_node_id()[:12],
            "batch_per_worker": batch_size, "global_batch": batch_size * world, "grad_bytes": grad_bytes,
            "deepspeed_step_s": ds_times, **parts, "torch_threads": torch.get_num_threads(),
        })
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, rows)
    # Train V2 keeps the metrics of checkpointed reports only: rank 0 hands the rows over as a checkpoint.
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            Path(tmp, "rows.json").write_text(json.dumps([r for part in gathered for r in part]))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"rank": rank}, checkpoint=checkpoint)


def run_trainer(workers: int, cfg: dict[str, Any], storage: Path, name: str) -> list[dict[str, Any]]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    trainer = TorchTrainer(
        scaling_worker,
        train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name=name, storage_path=str(storage), worker_runtime_env={"env_vars": {
            "PYTHONPATH": path, "OMP_NUM_THREADS": str(cfg["threads"]), "DS_ACCELERATOR": "cpu"}}),
    )
    start = time.perf_counter()
    result = trainer.fit()
    if getattr(result, "error", None):
        raise RuntimeError(f"{name}: {result.error}")
    with result.checkpoint.as_directory() as path:
        rows = json.loads(Path(path, "rows.json").read_text())
    for r in rows:
        r["fit_s"] = time.perf_counter() - start
    return rows


def summarize_phase(rows: list[dict[str, Any]], setup: str, batch: int) -> dict[str, Any]:
    """Per phase: median step times over steps, then the slowest rank (the one everyone waits for)."""
    mine = [r for r in rows if r["batch_per_worker"] == batch]
    world = mine[0]["world_size"]
    ds_step = max(statistics.median(r["deepspeed_step_s"]) for r in mine)
    parts = {k: max(statistics.median(r[k]) for r in mine) for k in ("compute_s", "wait_s", "allreduce_s",
                                                                      "optimizer_s")}
    decomposed = sum(parts.values())
    return {
        "setup": setup, "workers": world, "nodes": len({r["node"] for r in mine}), "batch_per_worker": batch,
        "global_batch": batch * world, "grad_mb": mine[0]["grad_bytes"] / 1e6,
        "deepspeed_step_s": ds_step, "deepspeed_step_spread": max(
            common.summarize(r["deepspeed_step_s"])["spread"] for r in mine),
        "volumes_per_s": batch * world / ds_step, "volumes_per_s_per_worker": batch / ds_step,
        **parts, "decomposed_step_s": decomposed, "allreduce_fraction": parts["allreduce_s"] / decomposed,
        "allreduce_gb_per_s": (2 * (world - 1) / world * mine[0]["grad_bytes"] / 1e9 / parts["allreduce_s"]
                               if world > 1 else None),
        "fit_s": mine[0]["fit_s"], "torch_threads": mine[0]["torch_threads"],
    }


def efficiencies(phases: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    """Weak: throughput(2)/(2 x throughput(1)) at the same per-worker batch. Strong: the same global batch."""
    one = next(p for p in phases if p["setup"] == "1 worker" and p["batch_per_worker"] == batch)
    out = {}
    for setup in ("2 workers, 1 node", "2 workers, 2 nodes (simulated)"):
        weak = next((p for p in phases if p["setup"] == setup and p["batch_per_worker"] == batch), None)
        strong = next((p for p in phases if p["setup"] == setup and p["global_batch"] == batch), None)
        out[setup] = {
            "weak_efficiency": weak["volumes_per_s"] / (2 * one["volumes_per_s"]) if weak else None,
            "strong_efficiency": strong["volumes_per_s"] / (2 * one["volumes_per_s"]) if strong else None,
        }
    return out


def projection(step_s: float, volumes_per_step: int, grad_bytes: float, bytes_per_volume: float,
               worker_volumes_per_s: float) -> list[dict[str, Any]]:
    """All-reduce and data-path needs per GPU at 8, 64 and 512 GPUs (assumptions in SCALING.md).

    Ring all-reduce moves 2(n-1)/n x bytes through each GPU's slowest link: NVLink (~300 GB/s achieved per
    GPU) inside a node of 8, InfiniBand across nodes (one NIC per GPU: 400 Gb/s = 50 GB/s, or 100 Gb/s =
    12.5 GB/s), plus a latency of ~5 us per ring hop (NCCL's trees cut that to ~2 log2(n) hops).
    """
    rows = []
    for n in (8, 64, 512):
        moved = 2 * (n - 1) / n * grad_bytes
        row: dict[str, Any] = {"gpus": n, "nodes": max(1, n // 8), "moved_mb_per_gpu": moved / 1e6}
        links = {"nvlink_300GBps": 300e9} if n <= 8 else {"ib_400Gbps": 50e9, "ib_100Gbps": 12.5e9}
        for link, bw in links.items():
            ring_latency = 2 * (n - 1) * 5e-6
            tree_latency = 2 * max(1, n.bit_length() - 1) * 5e-6
            row[f"allreduce_ms_{link}_ring"] = (moved / bw + ring_latency) * 1e3
            row[f"allreduce_ms_{link}_tree"] = (moved / bw + tree_latency) * 1e3
            row[f"allreduce_fraction_of_step_{link}_ring"] = (moved / bw + ring_latency) / step_s
        volumes_per_s = volumes_per_step / step_s
        need = volumes_per_s * bytes_per_volume / 1e6
        row.update(volumes_per_s_per_gpu=volumes_per_s, data_mb_s_per_gpu=need, data_gb_s_total=need * n / 1e3,
                   loader_workers_per_gpu=volumes_per_s / worker_volumes_per_s)
        rows.append(row)
    return rows


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster

    env = common.environment(torch.device("cpu"))
    cfg = {"crop": list(args.crop), "width": args.width, "warmup": args.warmup, "steps": args.steps,
           "threads": 1, "batches": [args.batch]}
    half = {**cfg, "batches": [args.batch, max(1, args.batch // 2)]}
    phases: list[dict[str, Any]] = []
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    env["ray_init_s"] = time.perf_counter() - start
    try:
        for setup, workers, config in (("1 worker", 1, cfg), ("2 workers, 1 node", 2, half)):
            print(f"{setup} ...", flush=True)
            rows = run_trainer(workers, config, work, f"scaling-{workers}")
            phases += [summarize_phase(rows, setup, b) for b in config["batches"]]
    finally:
        ray.shutdown()
    if not args.no_cluster:
        print("2 workers, 2 nodes (simulated) ...", flush=True)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        cluster.add_node(num_cpus=1)
        try:
            ray.init(address=cluster.address, log_to_driver=False)
            rows = run_trainer(2, half, work, "scaling-2nodes")
            phases += [summarize_phase(rows, "2 workers, 2 nodes (simulated)", b) for b in half["batches"]]
        finally:
            ray.shutdown()
            cluster.shutdown()
    for p in phases:
        print(f"  {p['setup']:32s} b{p['batch_per_worker']}: {p['volumes_per_s']:.2f} vol/s "
              f"({p['volumes_per_s_per_worker']:.2f}/worker); compute {p['compute_s']:.3f} s, "
              f"wait {p['wait_s']:.3f} s, all-reduce {p['allreduce_s']:.3f} s", flush=True)
    paper_b8_s = 8 / 92.7  # reference H200 step (benchmarks/README.md): ZeRO-1, torch_autocast bf16, channels_last, b8
    grid_bytes = 49 * 128 * 512  # a flattened Heidelberg volume (49 B-scans, D 128, 512 A-scans), uint8
    return {
        "benchmark": "scaling", "env": common.finish(env), "crop": list(args.crop), "width": args.width,
        "steps": args.steps, "warmup": args.warmup, "phases": phases,
        "efficiency": efficiencies(phases, args.batch),
        "projection_assumptions": {
            "step_s": paper_b8_s, "volumes_per_step": 8, "grad_bytes_fp32": FPN_PARAMS * 4,
            "bytes_per_volume": grid_bytes, "loader_worker_volumes_per_s": args.worker_vol_s,
        },
        "projection_fp32_grads": projection(paper_b8_s, 8, FPN_PARAMS * 4, grid_bytes, args.worker_vol_s),
        "projection_bf16_grads": projection(paper_b8_s, 8, FPN_PARAMS * 2, grid_bytes, args.worker_vol_s),
    }


def plot(result: dict[str, Any], path: Path) -> Path:
    phases = result["phases"]
    labels = [f"{p['setup']} b{p['batch_per_worker']}" for p in phases]
    return common.bar_plot(
        path, labels, [p["volumes_per_s"] for p in phases],
        notes=[f"(all-reduce {p['allreduce_fraction'] * 100:.0f}% of step)" for p in phases],
        title=f"FPN (width {result['width']}) crop {tuple(result['crop'])}, Ray Train + gloo, "
              f"{result['env']['device']}", xlabel="volumes/s (all workers)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop", default="8x64x64", help="nB x D x W of the synthetic batch")
    parser.add_argument("--batch", type=int, default=2, help="per-worker batch of the weak-scaling phase")
    parser.add_argument("--width", type=float, default=1.0, help="1.0 = the paper's 4.37M parameters")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per phase and way")
    parser.add_argument("--worker-vol-s", type=float, default=50.0,
                        help="volumes/s one loader worker delivers through the training transform (bench_data's "
                             "'ZarrSource + TrainTransform' row), for the projection")
    parser.add_argument("--no-cluster", action="store_true", help="skip the simulated two-node cluster")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.crop = tuple(int(v) for v in args.crop.lower().split("x"))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.TemporaryDirectory(prefix="octssl-bench-scaling-") as tmp:
        result = run(args, Path(tmp))
    print(json.dumps(result["efficiency"], indent=1))
    out = args.out or common.result_path("scaling", torch.device("cpu"))
    common.write_json(out, result)
    print(f"wrote {out} and {plot(result, out.with_suffix('.png'))}")
    return result


if __name__ == "__main__":
    main()
