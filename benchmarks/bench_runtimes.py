"""Runtimes of a bundle on this CPU: seconds per volume of the forward pass in torch, TorchScript and onnxruntime.

Usage: python benchmarks/bench_runtimes.py [--grid 16,64,64] [--width 0.5] [--batch 4] [--repeats 5]
                                           [--out benchmarks/results/runtimes-cpu.json]

An untrained fpn of the given width (speed does not depend on the weights) is exported as a bundle's
exports are (:func:`octssl.apply.runtimes.write_exports`: time and file sizes recorded), then the three
runtimes run the same normalised batch in turns - torch, TorchScript, ONNX, torch, ... - so a change of
load on a shared machine falls on all three alike. Reported per runtime: the median and spread of seconds
per volume, and the speed relative to torch; the largest probability difference to torch.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from common import environment, finish, summarize, write_json  # benchmarks/ is on sys.path when a script runs
from octssl.apply.runtimes import (
    EXPORT_FILES,
    RUNTIMES,
    TORCH,
    example_input,
    export_metadata,
    runtime_model,
    write_exports,
)
from octssl.corpus.manifest import parse_grid
from octssl.models import build_model

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="16,64,64")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "runtimes-cpu.json")
    args = parser.parse_args()
    grid = parse_grid(args.grid)
    env = environment(torch.device("cpu"))
    model = build_model("fpn", width=args.width).eval()
    with tempfile.TemporaryDirectory(prefix="bench-runtimes-") as folder:
        start = time.perf_counter()
        entries = write_exports(model, grid, 16, Path(folder), export_metadata({"task": "ga", "threshold": 0.5}))
        export_s = time.perf_counter() - start
        sizes = {kind: (Path(folder) / name).stat().st_size for kind, name in EXPORT_FILES.items()}
        runners = {kind: runtime_model(kind, Path(folder), entries, model, "bench") for kind in RUNTIMES}
        x = example_input(grid, 16, batch=args.batch)
        with torch.no_grad():
            reference = torch.sigmoid(model(x))
            difference = {kind: float((torch.sigmoid(run(x)) - reference).abs().max()) for kind, run in runners.items()}
            seconds: dict[str, list[float]] = {kind: [] for kind in RUNTIMES}
            for repeat in range(args.repeats + 1):  # the first round warms up
                for kind, run in runners.items():
                    begin = time.perf_counter()
                    run(x)
                    if repeat:
                        seconds[kind].append((time.perf_counter() - begin) / args.batch)
    per_volume = {kind: summarize(values) for kind, values in seconds.items()}
    results = {kind: {"s_per_volume": per_volume[kind],
                      "speed_vs_torch": per_volume[TORCH]["median"] / per_volume[kind]["median"],
                      "max_abs_probability_difference": difference[kind]} for kind in RUNTIMES}
    for kind, row in results.items():
        print(f"{kind:12s} {row['s_per_volume']['median']:.3f} s/volume  x{row['speed_vs_torch']:.2f} vs torch  "
              f"max |dp| {row['max_abs_probability_difference']:.1e}")
    payload = {"benchmark": "runtimes", "grid": list(grid), "model": "fpn", "width": args.width, "batch": args.batch,
               "export_s": export_s, "export_bytes": sizes, "results": results, "env": finish(env)}
    print(f"export {export_s:.1f} s, files {sizes}; wrote {write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
