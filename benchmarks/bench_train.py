"""Full-stack overhead: steps/s of Ray Train + DeepSpeed (1 worker) against a plain PyTorch loop, same run.

    python benchmarks/bench_train.py [--steps 40] [--grid 16,64,64] [--crop 16,64] [--batch 4] [--width 0.5]

Arms on one synthetic corpus, the same model, data, batch, optimiser (AdamW, warmup + cosine, grad
clipping) and loss: ``plain`` (a PyTorch loop: DataLoader over ZarrSource, model, clip, AdamW), ``trainer``
(octssl's Trainer through ``run_single_process``: DeepSpeed ZeRO-1, the loop's bookkeeping, no Ray),
``ray`` (``octssl.train.launch.run``: Ray Train, one worker with all CPUs, DeepSpeed); a plain arm runs
before, between and after the two (5 arms), and each stack arm's overhead is against the mean of the plain
arms around it, whose difference ("bracket drift") shows how much the shared machine's load moved.

Steady state: the step time between the first log record at or after ``--warm-steps`` and the last step,
from the timestamps the loop writes to metrics.jsonl (every ``log_every`` steps, 5 as in the jobs; each
5-step window is one repeat: median and spread). One-time costs (Ray start, worker start, DeepSpeed
init, first steps) and the tail (final validation, checkpoint, export) are reported apart. If the
overhead exceeds 10%, the per-step extras of the loop are timed one by one (``--profile`` always does).
Writes ``benchmarks/results/train-<device>.json`` and ``.png``.
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

JOBS = common.REPO / "jobs"
TARGET_OVERHEAD = 0.10


def job_config(corpus: Path, storage: Path, name: str, args: argparse.Namespace) -> Any:
    from octssl.config.job import load_config

    return load_config(JOBS / "pretrain.yaml", [
        f"data.corpus={corpus}", f"run.storage_path={storage}", f"run.name={name}",
        f"data.crop=[{args.crop[0]}, {args.crop[1]}]", f"data.batch_size={args.batch}", "data.loader_workers=0",
        f"model.width={args.width}", f"run.max_steps={args.steps}", f"run.log_every={args.log_every}",
        f"run.eval_every={10 * args.steps}", f"run.ckpt_every={10 * args.steps}", "data.val_volumes=2",
        "scaling.workers=1", f"scaling.cpus_per_worker={os.cpu_count()}", "scaling.max_failures=0",
        "deepspeed.precision=auto",
    ])


def steady(times: dict[int, float], warm_steps: int, window: int) -> dict[str, Any]:
    """Seconds per step in the windows between logged steps after ``warm_steps`` (each window one repeat)."""
    steps = sorted(s for s in times if s >= warm_steps)
    steps = [s for s in steps if (s - steps[0]) % window == 0]
    if len(steps) < 2:
        raise ValueError(f"too few logged steps after step {warm_steps}: raise --steps")
    per_step = [(times[b] - times[a]) / (b - a) for a, b in zip(steps, steps[1:], strict=False)]
    total = (times[steps[-1]] - times[steps[0]]) / (steps[-1] - steps[0])
    return {"from_step": steps[0], "to_step": steps[-1], "seconds_per_step": total,
            "steps_per_s": 1.0 / total, "windows": common.summarize(per_step)}


def plain_arm(config: Any, args: argparse.Namespace) -> dict[str, Any]:
    """A plain PyTorch loop doing the work the Trainer does: same source, transform, model, optimiser, loss."""
    from torch.utils.data import DataLoader

    from octssl.data.sources import ZarrSource
    from octssl.data.transforms import TrainTransform, collate
    from octssl.models import build_model
    from octssl.train.engine import lr_factor
    from octssl.train.objectives import build_objective

    start = time.time()
    c = config
    torch.manual_seed(c.run.seed)
    target = c.objective.target
    transform = TrainTransform(crop=tuple(c.data.crop), targets=(target,), seed=c.run.seed)
    source = ZarrSource(c.data.corpus, split="train", require=("oct", target), transform=transform,
                        repeats=c.data.crops_per_volume)
    model = build_model(c.model.name, width=c.model.width, checkpointing=c.model.checkpointing).train()
    objective = build_objective(c.objective.kind, target=target)
    optimizer = torch.optim.AdamW(model.parameters(), lr=c.optim.lr, weight_decay=c.optim.weight_decay)
    total = c.run.max_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, c.optim.warmup_steps, c.optim.schedule))
    times: dict[int, float] = {}
    step, losses = 0, []
    ready = time.time()
    while step < total:
        loader = DataLoader(source, batch_size=c.data.batch_size, shuffle=True, num_workers=c.data.loader_workers,
                            collate_fn=collate, drop_last=True)
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = objective.loss(model(batch["oct"]).float(), batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            if step % c.run.log_every == 0 or step == total:
                losses.append(float(loss.detach()))
                times[step] = time.time()
            if step == total:
                break
    return {"times": times, "setup_s": ready - start, "wall_s": time.time() - start, "start": start,
            "first_loss": losses[0], "final_loss": losses[-1]}


def _log_times(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return {r["step"]: r["time"] for r in rows}


def trainer_arm(config: Any) -> dict[str, Any]:
    from octssl.train.launch import run_single_process

    start = time.time()
    summary = run_single_process(config)
    return {"times": _log_times(Path(config.run_dir)), "wall_s": time.time() - start, "start": start,
            "first_loss": summary.first_loss, "final_loss": summary.final_loss}


def ray_arm(config: Any) -> dict[str, Any]:
    import ray

    from octssl.train.launch import run

    start = time.time()
    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray_init_s = time.time() - start
    summary = run(config, progress=False)
    wall = time.time() - start
    ray.shutdown()
    return {"times": _log_times(Path(config.run.storage_path) / config.run.name), "wall_s": wall, "start": start, "ray_init_s": ray_init_s,
            "first_loss": summary.first_loss, "final_loss": summary.final_loss}


def describe(name: str, arm: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    times = arm.pop("times")
    s = steady(times, args.warm_steps, args.log_every)
    first = min(times)
    last = max(times)
    # One-time cost: from the call to the first logged step, minus those steps at the best steady rate
    # (a lower bound on their time, so the estimate is not driven negative by load that came and went).
    startup = times[first] - arm["start"] - first * s["windows"]["min"]
    return {"arm": name, **s, "startup_s": startup, "tail_s": arm["start"] + arm["wall_s"] - times[last],
            **{k: v for k, v in arm.items() if k != "start"}}


def profile_extras(run_dir: Path, n: int = 200) -> dict[str, float]:
    """Milliseconds per step of the loop's per-step extras, timed alone: the samples/*.jsonl append, the
    workers/*.json heartbeat, the per-step Prometheus observation and (per log step) the gauge update."""
    from octssl.observe.metrics import TrainMetrics

    ids = [f"vol{i:05d}" for i in range(4)]
    samples = run_dir / "profile-samples.jsonl"
    heartbeat = run_dir / "profile-heartbeat.json"
    start = time.perf_counter()
    for step in range(n):
        with samples.open("a") as f:
            f.write(json.dumps({"step": step, "epoch": 0, "ids": ids}) + "\n")
    samples_ms = (time.perf_counter() - start) / n * 1e3
    start = time.perf_counter()
    for step in range(n):
        heartbeat.write_text(json.dumps({"pid": os.getpid(), "step": step, "time": time.time()}))
    heartbeat_ms = (time.perf_counter() - start) / n * 1e3
    metrics = TrainMetrics(rank=0, run="bench-profile")
    start = time.perf_counter()
    for step in range(n):
        metrics.update(step=step, loss=0.5, lr=1e-3, grad_norm=1.0, memory={"host_rss": 1e9})
    update_ms = (time.perf_counter() - start) / n * 1e3
    start = time.perf_counter()
    for _ in range(n):
        metrics.observe_step(seconds=0.1, local_s=0.05, data_wait_s=0.01, samples=4)
    observe_ms = (time.perf_counter() - start) / n * 1e3
    return {"samples_jsonl_append_ms": samples_ms, "heartbeat_write_ms": heartbeat_ms,
            "metrics_update_ms_per_log_step": update_ms, "metrics_observe_ms_per_step": observe_ms}


def engine_vs_plain(config: Any, depth: int, repeats: int) -> dict[str, Any]:
    """Seconds per step of the DeepSpeed engine against plain PyTorch on one fixed batch (no data loading)."""
    from octssl.models import build_model
    from octssl.models.precision import resolve_precision
    from octssl.train.engine import build_engine
    from octssl.train.objectives import build_objective

    c = config
    device = torch.device("cpu")
    common.init_single_process_group(device)
    batch = {"oct": torch.randn(c.data.batch_size, 1, c.data.crop[0], depth, c.data.crop[1]),
             "faf": torch.rand(c.data.batch_size, 1, c.data.crop[0], c.data.crop[1]),
             "id": [str(i) for i in range(c.data.batch_size)]}
    objective = build_objective(c.objective.kind, target="faf")
    torch.manual_seed(0)
    model = build_model(c.model.name, width=c.model.width).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=c.optim.lr)

    def plain_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        objective.loss(model(batch["oct"]).float(), batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), c.optim.grad_clip)
        optimizer.step()

    engine, _ = build_engine(build_model(c.model.name, width=c.model.width), c, 10**6,
                             resolve_precision(c.deepspeed.precision))

    def ds_step() -> None:
        engine.backward(objective.loss(engine(batch["oct"]).float(), batch))
        engine.step()

    out = {}
    for _ in range(2):  # interleaved twice: load drift hits both
        for name, fn in (("plain_s", plain_step), ("deepspeed_s", ds_step)):
            t = common.time_repeats(fn, device, warmup=2, repeats=repeats)
            out.setdefault(name, []).append(t["median"])
    return {k: statistics.median(v) for k, v in out.items()}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from octssl.corpus.synth import synthesize

    device = torch.device("cpu")
    env = common.environment(device)
    corpus = work / "corpus"
    synthesize(corpus, volumes=args.volumes, grid=args.grid, seed=0)
    storage = work / "runs"
    # Plain arms bracket each stack arm: the machine is shared, and load that changes during the run shows
    # as a difference between the two plain arms around an arm (its "bracket drift").
    order = [("plain", "plain 1"), ("trainer", "trainer (DeepSpeed, no Ray)"), ("plain", "plain 2"),
             ("ray", "ray (Ray Train + DeepSpeed)"), ("plain", "plain 3")]
    arms = []
    for i, (kind, name) in enumerate(order):
        print(name, flush=True)
        config = job_config(corpus, storage, f"arm{i}-{kind}", args)
        measured = {"plain": lambda c=config: plain_arm(c, args), "trainer": lambda c=config: trainer_arm(c),
                    "ray": lambda c=config: ray_arm(c)}[kind]()
        arms.append(describe(name, measured, args))
    plain = [a["seconds_per_step"] for a in arms if a["arm"].startswith("plain")]
    plain_s = statistics.mean(plain)
    for i, a in enumerate(arms):
        a["overhead_vs_plain"] = a["seconds_per_step"] / plain_s - 1
        if not a["arm"].startswith("plain"):
            before, after = arms[i - 1]["seconds_per_step"], arms[i + 1]["seconds_per_step"]
            bracket = (before + after) / 2
            a["overhead_vs_bracket"] = a["seconds_per_step"] / bracket - 1
            a["bracket_drift"] = abs(before - after) / bracket
    full = next(a for a in arms if a["arm"].startswith("ray"))
    result: dict[str, Any] = {
        "benchmark": "train", "env": env, "grid": list(args.grid), "crop": list(args.crop), "batch": args.batch,
        "model": f"fpn width {args.width}", "steps": args.steps, "log_every": args.log_every,
        "warm_steps": args.warm_steps, "loader_workers": 0, "arms": arms,
        "plain_seconds_per_step": plain_s, "overhead": full["overhead_vs_bracket"],
        # The least-disturbed 5-step window of each arm: robust to load that comes and goes.
        "overhead_best_windows": full["windows"]["min"] / min(a["windows"]["min"] for a in arms
                                                            if a["arm"].startswith("plain")) - 1,
        "overhead_bracket_drift": full["bracket_drift"], "target_overhead": TARGET_OVERHEAD,
    }
    if args.profile or full["overhead_vs_bracket"] > TARGET_OVERHEAD:
        print("profiling the per-step extras", flush=True)
        config = job_config(corpus, storage, "profile", args)
        result["profile"] = {"extras": profile_extras(storage), "step_no_data": engine_vs_plain(config, args.grid[1], args.repeats)}
    common.finish(env)
    return result


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{'arm':30s} {'steps/s':>8s} {'s/step':>8s} {'spread':>7s} {'overhead':>9s} {'(drift)':>8s} "
          f"{'startup s':>9s} {'tail s':>7s}")
    for a in result["arms"]:
        over = f"{a['overhead_vs_bracket'] * 100:8.1f}% {a['bracket_drift'] * 100:7.1f}%" if "bracket_drift" in a else ""
        print(f"{a['arm']:30s} {a['steps_per_s']:8.3f} {a['seconds_per_step']:8.4f} {a['windows']['spread']:7.2f} "
              f"{over:>18s} {a['startup_s']:9.1f} {a['tail_s']:7.1f}")
    print(f"overhead of the full stack: {result['overhead'] * 100:+.1f}% against the plain arms around it, "
          f"{result['overhead_best_windows'] * 100:+.1f}% best window against best window")
    if "profile" in result:
        print("profile:", json.dumps(result["profile"], indent=None, default=lambda v: round(v, 4)))


def plot(result: dict[str, Any], path: Path) -> Path:
    arms = result["arms"]
    return common.bar_plot(path, [a["arm"] for a in arms], [a["steps_per_s"] for a in arms],
                           notes=[f"({a['overhead_vs_bracket'] * 100:+.1f}% vs plain around it)"
                                  if "overhead_vs_bracket" in a else "" for a in arms],
                           title=f"steady-state steps/s, {result['model']}, batch {result['batch']}, "
                                 f"{result['env']['device']}", xlabel="steps/s")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warm-steps", type=int, default=10, help="steps excluded from the steady state")
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--volumes", type=int, default=12)
    parser.add_argument("--grid", default="16,64,64", help="nB,D,W of the synthetic volumes")
    parser.add_argument("--crop", default="16,64", help="training crop nB,W")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the no-data engine comparison")
    parser.add_argument("--profile", action="store_true", help="time the per-step extras even under the target")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.grid = tuple(int(v) for v in args.grid.split(","))
    args.crop = tuple(int(v) for v in args.crop.split(","))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.TemporaryDirectory(prefix="octssl-bench-train-") as tmp:
        result = run(args, Path(tmp))
    print_table(result)
    out = args.out or common.result_path("train", torch.device("cpu"))
    common.write_json(out, result)
    print(f"wrote {out} and {plot(result, out.with_suffix('.png'))}")
    return result


if __name__ == "__main__":
    main()
