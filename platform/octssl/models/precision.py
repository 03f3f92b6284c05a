"""The precision policy of training and inference: what ``auto``, ``fp32``, ``bf16`` and ``fp16`` mean on this
device. A model-level concern (not a training one): the trainer's engine and :mod:`octssl.apply.predictor`
both resolve it here, so a model is run for validation and for prediction under the same policy."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

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
