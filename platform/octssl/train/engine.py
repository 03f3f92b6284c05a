"""DeepSpeed engine construction from a job config: precision policy, optimiser, LR schedule."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from octssl.config.job import JobConfig
from octssl.errors import ConfigError


@dataclass(frozen=True)
class Precision:
    """What the precision policy resolved to on this device."""

    name: str  # fp32 | bf16 | fp16
    autocast_dtype: torch.dtype | None
    channels_last: bool  # feed channels_last_3d inputs (parameters stay contiguous)


def on_gpu() -> bool:
    """Whether this process trains on a CUDA device (DS_ACCELERATOR=cpu forces the CPU)."""
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16 in /proc/cpuinfo)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str, gpu: bool | None = None) -> Precision:
    """``auto``: fp32 on CPU, bf16 autocast + channels_last_3d on GPU.

    On CPU, ``bf16`` is accepted only where the CPU has native bf16 units (measured on an AVX512-BF16
    EPYC: 1.5x fp32 at the paper crop; on AVX2-only CPUs bf16 is ~100x slower). ``auto`` stays fp32 on
    every CPU: the bf16 gain is measured for the step only, not yet for what it does to convergence.
    """
    gpu = on_gpu() if gpu is None else gpu
    if requested == "auto":
        requested = "bf16" if gpu else "fp32"
    if requested == "fp32":
        return Precision("fp32", None, channels_last=gpu)
    if not gpu:
        if requested == "bf16" and cpu_has_native_bf16():
            return Precision("bf16", torch.bfloat16, channels_last=False)
        raise ConfigError(
            f"deepspeed.precision={requested} needs a GPU (or, for bf16, a CPU with native bf16 units): "
            "use fp32 (or auto); emulated half precision here is ~100x slower than fp32"
        )
    dtype = torch.bfloat16 if requested == "bf16" else torch.float16
    return Precision(requested, dtype, channels_last=True)


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
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    gpu = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"
    dist.init_process_group("nccl" if gpu else "gloo", rank=0, world_size=1)
