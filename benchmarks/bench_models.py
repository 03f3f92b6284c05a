"""Model benchmark: parameters, GFLOP per volume at the paper crop, train-step speed, saved activations.

Usage: python benchmarks/bench_models.py [--models fpn,lachinov] [--crop 16x64x64] [--batch 2] [--steps 5]
                                         [--out benchmarks/results/models-cpu.json]

Per model: trainable parameters; GFLOP of one forward and one forward+backward per volume at the paper's
training crop (32 x 128 x 256, nB x D x W), counted on the meta device (no compute); train-step volumes/s
at a small crop (fp32, SGD, segmentation loss), with and without activation checkpointing; bytes saved for
backward at that crop with and without checkpointing. ReSensNet needs D = 128, so its small crop uses D = 128.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import common
from common import cpu_name  # benchmarks/ is on sys.path when a script runs
from octssl.models import MODELS, build_model
from octssl.models.profile import count_flops, saved_activation_bytes
from octssl.train.objectives import build_objective

PAPER_CROP = (32, 128, 256)


def parse_crop(text: str) -> tuple[int, int, int]:
    bscans, depth, ascans = (int(v) for v in text.lower().split("x"))
    return bscans, depth, ascans


def train_speed(name: str, crop: tuple[int, int, int], batch: int, steps: int, checkpointing: bool) -> dict[str, float]:
    """Volumes/s of full train steps (forward, Dice+BCE loss, backward, SGD), from the median and the best step.

    Two warm-up steps first (allocator, oneDNN kernel selection). The machine is shared: the best step is
    the least disturbed by other processes, the median the typical one.
    """
    torch.manual_seed(0)
    model = build_model(name, checkpointing=checkpointing).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    objective = build_objective("segmentation", target="ga")
    volume = torch.randn(batch, 1, *crop)
    mask = (torch.rand(batch, 1, crop[0], crop[2]) > 0.7).float()
    batch_dict = {"ga": mask, "id": [str(i) for i in range(batch)]}
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        objective.loss(model(volume), batch_dict).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    timed = times[2:]
    return {"median": batch / statistics.median(timed), "best": batch / min(timed)}


def activation_bytes(name: str, crop: tuple[int, int, int], batch: int, checkpointing: bool) -> int:
    torch.manual_seed(0)
    model = build_model(name, checkpointing=checkpointing).train()
    return saved_activation_bytes(model, torch.randn(batch, 1, *crop))


def bench_model(name: str, crop: tuple[int, int, int], batch: int, steps: int) -> dict[str, Any]:
    if name == "resensnet":
        crop = (crop[0], 128, crop[2])
    flops = count_flops(name, PAPER_CROP)
    train_flops = count_flops(name, crop)["forward_backward"]
    plain_bytes = activation_bytes(name, crop, batch, False)
    ckpt_bytes = activation_bytes(name, crop, batch, True)
    plain = train_speed(name, crop, batch, steps, False)
    ckpt = train_speed(name, crop, batch, steps, True)
    row = {
        "model": name,
        "params": sum(p.numel() for p in build_model(name).parameters() if p.requires_grad),
        "gflop_fwd_per_volume": flops["forward"] / 1e9,
        "gflop_fwd_bwd_per_volume": flops["forward_backward"] / 1e9,
        "flop_crop": list(PAPER_CROP),
        "train_crop": list(crop),
        "train_gflop_fwd_bwd_per_volume": train_flops / 1e9,
        "batch": batch,
        "volumes_per_s": plain["median"],
        "volumes_per_s_best": plain["best"],
        "volumes_per_s_checkpointing": ckpt["median"],
        "volumes_per_s_checkpointing_best": ckpt["best"],
        "achieved_gflop_per_s_best": plain["best"] * train_flops / 1e9,
        "saved_mib": plain_bytes / 2**20,
        "saved_mib_checkpointing": ckpt_bytes / 2**20,
        "saved_ratio": ckpt_bytes / plain_bytes,
    }
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | params | GFLOP/vol fwd+bwd (32x128x256) | train vol/s, median (best): ckpt off | ckpt on "
        "| saved MiB ckpt off / on (ratio) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['gflop_fwd_bwd_per_volume']:.1f} | "
            f"{r['volumes_per_s']:.2f} ({r['volumes_per_s_best']:.2f}) | "
            f"{r['volumes_per_s_checkpointing']:.2f} ({r['volumes_per_s_checkpointing_best']:.2f}) | "
            f"{r['saved_mib']:.0f} / {r['saved_mib_checkpointing']:.0f} ({r['saved_ratio']:.2f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--crop", default="16x64x64", help="train-step crop nB x D x W")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/models-cpu.json"))
    args = parser.parse_args()
    crop = parse_crop(args.crop)
    load_before = os.getloadavg()[0]
    rows = [bench_model(name, crop, args.batch, args.steps) for name in args.models.split(",")]
    result = {
        "device": f"{cpu_name()}, {torch.get_num_threads()} threads (2-core CPU)",
        "torch": torch.__version__,
        "precision": "fp32",
        "optimizer": "SGD lr 0.01 momentum 0.9",
        "loss": "segmentation (Dice + BCE) / 2",
        "steps_timed": args.steps,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "models": rows,
    }
    common.write_json(args.out, result, indent=2)
    print(markdown(rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
