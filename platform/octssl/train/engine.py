"""DeepSpeed engine construction from a job config: optimiser, LR schedule (the precision policy is :mod:`octssl.models.precision`)."""

from __future__ import annotations

import math
import os
import socket
from typing import Any

import torch

from octssl.config.job import JobConfig
from octssl.models.precision import Precision


def deepspeed_config(config: JobConfig, precision: Precision) -> dict[str, Any]:
    """The DeepSpeed JSON config. Half precision goes through ``torch_autocast``: DeepSpeed's own
    ``bf16`` section casts BatchNorm inputs but not its running stats and fails."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.data.batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": config.deepspeed.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if config.optim.grad_clip > 0:
        ds["gradient_clipping"] = config.optim.grad_clip
    if precision.autocast_dtype is not None:
        ds["torch_autocast"] = {
            "enabled": True,
            "dtype": "bfloat16" if precision.autocast_dtype == torch.bfloat16 else "float16",
        }
    return ds


def build_optimizer(model: torch.nn.Module, config: JobConfig) -> torch.optim.Optimizer:
    """A torch optimiser object: a DeepSpeed-declared one would JIT-compile fused_adam (~77 s on CPU)."""
    o = config.optim
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warmup over ``warmup`` steps, then constant or cosine decay to 0 at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, config: JobConfig, total_steps: int):
    """Warmup + cosine (or constant) as a LambdaLR that DeepSpeed steps and checkpoints."""
    o = config.optim
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, o.warmup_steps, o.schedule)
    )


def build_engine(model: torch.nn.Module, config: JobConfig, total_steps: int, precision: Precision):
    """Wrap ``model`` in a DeepSpeed engine on the process group that Ray Train (or the caller) set up."""
    import deepspeed

    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(config, precision),
        dist_init_required=not torch.distributed.is_initialized(),
    )
    return engine, scheduler


def init_single_process_group() -> None:
    """A world-size-1 process group for a run outside Ray Train (single process, sweep trial): NCCL on a GPU
    unless ``DS_ACCELERATOR=cpu`` asks for the CPU path, gloo otherwise. No-op when one exists."""

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    gpu = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"
    dist.init_process_group("nccl" if gpu else "gloo", rank=0, world_size=1)
