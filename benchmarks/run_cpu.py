"""The CPU benchmark suite (`make bench`): data, models, train step, full-stack overhead, scaling in <= 10 min.

    python benchmarks/run_cpu.py                 # run everything, write results/*-cpu-<cpu>.json + .png
    python benchmarks/run_cpu.py --only step,train
    python benchmarks/run_cpu.py --table         # print the Markdown table of the latest results (README)

Each benchmark runs in its own process (clean thread pools, process groups and Ray) with the sizes below,
chosen so that the suite fits in 10 minutes on the 2-core CPU machine; a benchmark that fails or times out
is recorded as such in ``results/suite-<device>.json`` and the others still run. bench_step runs last and
gets the time left as its budget, so that under heavy load it reports rows as skipped instead of overrunning;
a benchmark still running 15 minutes after the start is stopped and reported as timed out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import common

HERE = Path(__file__).resolve().parent
SUITE_S = 600.0
HARD_LIMIT_S = 900.0  # a benchmark still running then is stopped and reported as timed out


def commands(slug: str, deadline: float) -> dict[str, list[str]]:
    """Each benchmark's command line, in run order; bench_step last, with the time left as its budget."""
    out = common.RESULTS
    left = max(60.0, deadline - time.monotonic() - 30)
    return {
        "data": ["bench_data.py", "--volumes", "16", "--grid", "32,128,256", "--workers", "2", "--repeats", "2",
                 "--passes", "2", "--train-steps", "8", "--train-width", "0.25", "--train-batch", "2",
                 "--train-crop", "16,128", "--out", str(out / f"data-{slug}.json")],
        "models": ["bench_models.py", "--crop", "8x64x64", "--batch", "2", "--steps", "2",
                   "--out", str(out / f"models-{slug}.json")],
        "train": ["bench_train.py", "--steps", "30", "--out", str(out / f"train-{slug}.json")],
        "scaling": ["bench_scaling.py", "--steps", "3", "--worker-vol-s", f"{source_rate(slug):.1f}",
                    "--out", str(out / f"scaling-{slug}.json")],
        "step": ["bench_step.py", "--device", "cpu", "--batch", "1", "--warmup", "1", "--repeats", "2",
                 "--budget-s", f"{left:.0f}", "--out", str(out / f"step-{slug}.json")],
    }


def source_rate(slug: str, default: float = 50.0) -> float:
    """Volumes/s of one loader worker through the training transform, from this device's data result."""
    path = common.RESULTS / f"data-{slug}.json"
    if not path.is_file():
        return default
    rows = [r for r in json.loads(path.read_text())["rows"]
            if r["path"].startswith("ZarrSource + TrainTransform") and r["workers"] == 1]
    return rows[0]["volumes_per_s"] if rows else default


def run_one(name: str, argv: list[str], timeout: float) -> dict[str, Any]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    print(f"== {name}: {' '.join(argv)}", flush=True)
    try:
        proc = subprocess.run([sys.executable, str(HERE / argv[0]), *argv[1:]], env=env, cwd=common.REPO,
                              timeout=timeout)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        status = f"timed out after {timeout:.0f} s"
    seconds = time.monotonic() - start
    print(f"== {name}: {status} in {seconds:.0f} s", flush=True)
    return {"benchmark": name, "status": status, "seconds": round(seconds, 1)}


def plot_data(path: Path) -> None:
    result = json.loads(path.read_text())
    rows = [r for r in result["rows"] if r["ratio_to_raw"] is not None]
    common.bar_plot(path.with_suffix(".png"), [f"{r['path']} ({r['workers']} workers)" for r in rows],
                    [r["MB_per_s"] for r in rows], notes=[f"(x{r['ratio_to_raw']:.2f} raw)" for r in rows],
                    title=f"read {result['volumes']} volumes of {tuple(result['grid'])}, {result['cpus']} CPUs",
                    xlabel="MB/s of voxels")


def plot_models(path: Path) -> None:
    result = json.loads(path.read_text())
    rows = result["models"]
    labels = [f"{r['model']}{' ckpt' if ckpt else ''}" for r in rows for ckpt in (False, True)]
    values = [r["volumes_per_s_checkpointing" if ckpt else "volumes_per_s"] for r in rows for ckpt in (False, True)]
    common.bar_plot(path.with_suffix(".png"), labels, values,
                    title=f"train step at {tuple(rows[0]['train_crop'])}, batch {rows[0]['batch']}: {result['device']}",
                    xlabel="volumes/s (median)")


def results(kind: str) -> list[dict[str, Any]]:
    """Every ``results/<kind>-*.json`` (one per device or variant), oldest first, each with its file name."""
    files = sorted(common.RESULTS.glob(f"{kind}-*.json"), key=lambda p: p.stat().st_mtime)
    return [json.loads(f.read_text()) | {"_file": f.name} for f in files]


def _load(result: dict[str, Any]) -> str:
    """The 1-minute load average when the benchmark started (the machine is shared)."""
    env = result.get("env") or {}
    for value in (env.get("load_average_start"), result.get("load_average_1min"), result.get("load_avg_1m_before")):
        if value is not None:
            return f"{value[0] if isinstance(value, list) else value:g}"
    return "not recorded"


def _device(result: dict[str, Any]) -> str:
    return (result.get("env") or {}).get("device") or result.get("device") or f"{result.get('cpus')} CPUs"


def table() -> str:
    """Markdown rows summarising the results of every benchmark (README's table)."""
    lines = ["| benchmark | device (1-min load at start) | headline | file |", "|---|---|---|---|"]

    def add(name: str, result: dict[str, Any], headline: str) -> None:
        lines.append(f"| {name} | {_device(result)} ({_load(result)}) | {headline} | `{result['_file']}` |")

    for step in results("step"):
        base = next((r for r in step["rows"] if r["role"] == "baseline" and not r["checkpointing"]), {})
        win = next((r for r in step["rows"] if r["label"] == step["winner"]), {})
        tuned = (f"octssl `{step['winner']}` {win['volumes_per_s']:.3f} vol/s (x{win.get('ratio_to_paper', float('nan')):.2f})"
                 if win else "no octssl row ran")
        add(f"step: FPN {'x'.join(map(str, step['crop']))}", step,
            f"paper setup {base.get('volumes_per_s', float('nan')):.3f} vol/s; {tuned}; "
            f"fastest precision/layout = auto policy: {step['policy']['matches']}")
    for levers in results("levers"):
        if levers.get("smoke"):
            continue
        rows = {r["name"]: r for r in levers["rows"] if r["status"] == "ok"}
        best, engine = levers.get("best") or {}, levers.get("best_octssl_engine") or {}
        add(f"levers: FPN {'x'.join(map(str, levers['crop']))}", levers,
            f"paper setup {rows.get('paper', {}).get('volumes_per_s', float('nan')):.1f} vol/s; octssl default "
            f"x{levers.get('octssl_default_ratio') or float('nan'):.2f}; fastest row `{best.get('name')}` "
            f"x{best.get('ratio_to_paper') or float('nan'):.2f}; fastest DeepSpeed row `{engine.get('name')}` "
            f"x{engine.get('ratio_to_paper') or float('nan'):.2f}")
    for train in results("train"):
        ray = next(a for a in train["arms"] if a["arm"].startswith("ray"))
        add("train: full stack vs plain loop", train,
            f"plain {1 / train['plain_seconds_per_step']:.2f} steps/s, Ray Train + DeepSpeed "
            f"{ray['steps_per_s']:.2f} steps/s: overhead {train['overhead'] * 100:+.1f}% against the plain arms "
            f"around it (their drift {ray['bracket_drift'] * 100:.0f}%), {train['overhead_best_windows'] * 100:+.1f}% "
            f"best window against best window (target <= 10%); "
            f"one-time startup {ray['startup_s']:.0f} s")
    for scaling in results("scaling"):
        one = scaling["efficiency"]["2 workers, 1 node"]
        two = scaling["efficiency"]["2 workers, 2 nodes (simulated)"]
        add("scaling: Ray Train, gloo", scaling,
            f"2 workers: weak {_pct(one['weak_efficiency'])}, strong {_pct(one['strong_efficiency'])}; "
            f"2 simulated nodes: weak {_pct(two['weak_efficiency'])}, strong {_pct(two['strong_efficiency'])}")
    for data in results("data"):
        best = {p: max((r for r in data["rows"] if r["path"] == p), key=lambda r: r["MB_per_s"])
                for p in ("ZarrSource", "StreamSource")}
        waits = ", ".join(f"{r['source']} {r['loader_workers']}w {r['data_wait_fraction'] * 100:.1f}%"
                          for r in data.get("training", []) if r["status"] == "ok")
        add(f"data: {data['volumes']} x {'x'.join(map(str, data['grid']))}{' cold' if data['cold_cache'] else ''}",
            data, f"ZarrSource {best['ZarrSource']['MB_per_s']:.0f} MB/s ({best['ZarrSource']['workers']}w), "
                  f"StreamSource {best['StreamSource']['MB_per_s']:.0f} MB/s ({best['StreamSource']['workers']}w)"
                  + (f"; data-wait share of training steps: {waits}" if waits else ""))
    for models in results("models"):
        fpn = next((r for r in models["models"] if r["model"] == "fpn"), models["models"][0])
        add("models", models, f"{fpn['model']} {fpn['params']:,} params, {fpn['gflop_fwd_bwd_per_volume']:.0f} "
                              f"GFLOP/vol fwd+bwd at 32x128x256; {fpn['volumes_per_s']:.2f} vol/s at "
                              f"{'x'.join(map(str, fpn['train_crop']))} (ckpt {fpn['volumes_per_s_checkpointing']:.2f})")
    for ingest in results("ingest"):
        best = max(ingest.get("real_vol", []), key=lambda r: r["mb_per_s"], default=None)
        if best:
            add("ingest: Heidelberg .vol", ingest,
                f"{best['files_per_s']:.1f} files/s, {best['mb_per_s']:.0f} MB/s ({best['workers']} workers)")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return f"{value * 100:.0f}%" if value is not None else "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="data,models,train,scaling,step", help="comma-separated benchmarks")
    parser.add_argument("--table", action="store_true", help="only print the Markdown table of the latest results")
    args = parser.parse_args(argv)
    if args.table:
        print(table())
        return 0
    device = torch.device("cpu")
    slug = common.device_slug(device)
    env = common.environment(device)
    start = time.monotonic()
    deadline = start + SUITE_S
    runs = []
    for name in args.only.split(","):
        argv_ = commands(slug, deadline)[name]
        timeout = max(60.0, start + HARD_LIMIT_S - time.monotonic())
        runs.append(run_one(name, argv_, timeout))
        if name == "data" and runs[-1]["status"] == "ok":
            plot_data(common.RESULTS / f"data-{slug}.json")
        if name == "models" and runs[-1]["status"] == "ok":
            plot_models(common.RESULTS / f"models-{slug}.json")
    total = sum(r["seconds"] for r in runs)
    common.write_json(common.RESULTS / f"suite-{slug}.json",
                      {"env": common.finish(env), "runs": runs, "total_s": total, "limit_s": SUITE_S})
    print(f"\nsuite: {total:.0f} s (limit {SUITE_S:.0f} s)")
    for r in runs:
        print(f"  {r['benchmark']:8s} {r['status']:24s} {r['seconds']:6.0f} s")
    print("\n" + table())
    return 0 if all(r["status"] == "ok" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
