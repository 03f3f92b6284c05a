"""The CPU benchmark suite (`make bench`): data, models, train step, full-stack overhead, scaling in <= 10 min.

``results/suite-<device>.json`` lists every output of the run with its sha256: commit them together
(tests/benchmarks/test_provenance.py fails when a committed suite file names outputs that are not there).

    python benchmarks/run_cpu.py                 # run everything, write results/*-cpu-<cpu>.json + .png
    python benchmarks/run_cpu.py --only step,train
    python benchmarks/run_cpu.py --table         # print the results table (python benchmarks/table.py)

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
import table

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="data,models,train,scaling,step", help="comma-separated benchmarks")
    parser.add_argument("--table", action="store_true", help="only print the table of the latest results")
    args = parser.parse_args(argv)
    if args.table:
        print(table.table())
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
        out = Path(argv_[argv_.index("--out") + 1])
        runs[-1]["outputs"] = common.file_digests([out, out.with_suffix(".png")])  # commit these with this file
    total = sum(r["seconds"] for r in runs)
    common.write_json(common.RESULTS / f"suite-{slug}.json",
                      {"env": common.finish(env), "runs": runs, "total_s": total, "limit_s": SUITE_S})
    print(f"\nsuite: {total:.0f} s (limit {SUITE_S:.0f} s)")
    for r in runs:
        print(f"  {r['benchmark']:8s} {r['status']:24s} {r['seconds']:6.0f} s")
    print("\n" + table.table())
    table.main([])  # the results table of benchmarks/README.md
    return 0 if all(r["status"] == "ok" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
