"""Prediction throughput: volumes/s of `octssl predict` on a synthetic corpus, per batch size, end to end.

Usage: python benchmarks/bench_predict.py [--volumes 24] [--grid 16,64,64] [--width 0.5] [--batches 1,4]
                                          [--repeats 2] [--out benchmarks/results/predict-cpu.json]

A bundle is made from an untrained fpn of the given width (throughput does not depend on the weights:
the threshold only changes what is counted), then ``predict`` runs on every volume of the corpus (read,
normalise, forward, measure, PNGs, table) into a fresh folder. Reported: the best and median volumes/s over
repeats per batch size, with the share of time in the forward pass (measured separately, in-process).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import cpu_name, environment, finish, write_json  # benchmarks/ is on sys.path when a script runs
from octssl.apply.bundle import export_model, load_bundle
from octssl.apply.predict import predict
from octssl.apply.predictor import Predictor
from octssl.config.job import dump_config, load_config
from octssl.corpus.manifest import parse_grid
from octssl.corpus.synth import synthesize
from octssl.models import build_model, save_weights

REPO = Path(__file__).resolve().parents[1]


def make_bundle(root: Path, corpus: Path, grid: tuple[int, int, int], width: float) -> Path:
    run = root / "runs" / "bench"
    job = load_config(REPO / "jobs" / "finetune_ga.yaml", [f"data.corpus={corpus}", f"model.width={width}",
                                                           f"run.storage_path={run.parent}", "run.name=bench"])
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(job))
    card = {"objective": job.objective.model_dump(), "grid": ["x".join(map(str, grid))],
            "threshold": 0.5, "val": {}, "val_volumes": 0}  # a benchmark bundle: no val choice to record
    save_weights(build_model("fpn", width=width), run / "best" / "model.safetensors", {"card": card})
    return export_model(run, "ga", root / "bundle")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=24)
    parser.add_argument("--grid", default="16,64,64")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "predict-cpu.json")
    args = parser.parse_args()
    grid = parse_grid(args.grid)
    env = environment(torch.device("cpu"))
    root = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    try:
        corpus = synthesize(root / "corpus", volumes=args.volumes, grid=grid, seed=0, labelled=0.5).path
        bundle = make_bundle(root, corpus, grid, args.width)
        results = []
        for batch in [int(b) for b in args.batches.split(",")]:
            rates = []
            for repeat in range(args.repeats):
                out = root / f"pred-{batch}-{repeat}"
                start = time.perf_counter()
                report = predict(bundle, [corpus], out, batch_size=batch, progress=False)
                rates.append(len(report.rows) / (time.perf_counter() - start))
                shutil.rmtree(out)
            results.append({"batch_size": batch, "volumes": args.volumes, "volumes_per_s_best": max(rates),
                            "volumes_per_s_median": statistics.median(rates)})
            print(json.dumps(results[-1]))
        predictor = Predictor.for_model(load_bundle(bundle).model, grid=grid, batch_size=4)
        volume, spacings = [np.zeros(grid, np.uint8)] * 4, [(0.1, 0.004, 0.01)] * 4
        predictor.probabilities(volume, spacings)
        start = time.perf_counter()
        predictor.probabilities(volume, spacings)
        forward = (time.perf_counter() - start) / 4
    finally:
        shutil.rmtree(root, ignore_errors=True)
    payload = {"benchmark": "predict", "cpu": cpu_name(), "volumes": args.volumes, "grid": list(grid), "model": "fpn",
               "width": args.width, "results": results, "forward_s_per_volume_batch4": forward,
               "env": finish(env)}
    print(f"wrote {write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
