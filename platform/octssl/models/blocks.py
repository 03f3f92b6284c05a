"""Building blocks shared by the models: fp32 norms, residual units, stage checkpointing, the model base."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from octssl.errors import ModelError

Triple = tuple[int, int, int]


def scaled(channels: int, width: float, multiple: int = 1) -> int:
    """Channel count for a width multiplier, rounded to `multiple` and at least `multiple`."""
    return max(multiple, int(round(channels * width / multiple)) * multiple)


class _Fp32NormMixin:
    """Runs the norm in fp32 with autocast off: bf16 batch statistics lose too much precision.

    The output stays fp32; the next convolution under autocast casts it down again.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The parameters' dtype: fp32 unless the whole model was cast down on purpose.
        state = (self.weight, self.running_mean)  # type: ignore[attr-defined]
        dtype = next((t.dtype for t in state if t is not None), torch.float32)
        if not torch.amp.is_autocast_available(x.device.type):  # e.g. "meta", used to count FLOPs
            return super().forward(x.to(dtype))  # type: ignore[misc]
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().forward(x.to(dtype))  # type: ignore[misc]


class BatchNorm3d(_Fp32NormMixin, nn.BatchNorm3d):
    """BatchNorm3d computed in fp32 under autocast."""


class BatchNorm2d(_Fp32NormMixin, nn.BatchNorm2d):
    """BatchNorm2d computed in fp32 under autocast."""


class InstanceNorm3d(_Fp32NormMixin, nn.InstanceNorm3d):
    """Affine InstanceNorm3d computed in fp32 under autocast."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, affine=True)


def conv_bn3d(c_in: int, c_out: int, kernel: Triple, stride: Triple = (1, 1, 1), padding: Triple = (0, 0, 0)) -> nn.Sequential:
    """Conv3d without bias (BN follows and has its own shift) + BatchNorm3d."""
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False), BatchNorm3d(c_out)
    )


def conv_bn2d(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
    """Conv2d without bias + BatchNorm2d, 'same' padding."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False), BatchNorm2d(c_out))


class ResidualUnit(nn.Module):
    """conv-BN-ReLU, ..., conv-BN (last without ReLU), plus shortcut (identity or given), then ReLU.

    With `residual=False` it is a plain conv chain followed by ReLU (the FPB's final projection conv).
    """

    def __init__(self, layers: Sequence[nn.Module], shortcut: nn.Module | None, residual: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.shortcut = shortcut
        self.residual = residual
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for i, layer in enumerate(self.layers):
            out = layer(out)
            if i < len(self.layers) - 1:
                out = torch.relu_(out)  # BN backward keeps its input, not its output
        if self.residual:
            out = out + (self.shortcut(x) if self.shortcut is not None else x)
        return self.relu(out)


def residual_unit3d(c_in: int, c_out: int, kernels: Sequence[Triple], strides: Sequence[Triple] | None = None,
                    shortcut: str = "auto", shortcut_stride: Triple = (1, 1, 1)) -> ResidualUnit:
    """A 3D residual unit; padding keeps size along every kernel axis (k // 2).

    shortcut: "auto" (1x1x1 conv+BN when channels or stride change, else identity), "none" (no residual).
    """
    strides = strides or [(1, 1, 1)] * len(kernels)
    layers = []
    for i, (kernel, stride) in enumerate(zip(kernels, strides, strict=True)):
        padding = tuple(k // 2 for k in kernel)
        layers.append(conv_bn3d(c_in if i == 0 else c_out, c_out, kernel, stride, padding))  # type: ignore[arg-type]
    if shortcut == "none":
        return ResidualUnit(layers, None, residual=False)
    needs_projection = c_in != c_out or shortcut_stride != (1, 1, 1)
    short = conv_bn3d(c_in, c_out, (1, 1, 1), shortcut_stride) if needs_projection else None
    return ResidualUnit(layers, short)


def residual_block2d(c_in: int, c_out: int) -> ResidualUnit:
    """Two 3x3 en-face convs + BN, 1x1 conv+BN shortcut when channels change (the decoder block)."""
    short = conv_bn2d(c_in, c_out, 1) if c_in != c_out else None
    return ResidualUnit([conv_bn2d(c_in, c_out, 3), conv_bn2d(c_out, c_out, 3)], short)


class _KeepNormStats(AbstractContextManager):
    """Restores running statistics after checkpoint recomputation, which would otherwise update them twice."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> _KeepNormStats:
        self.saved = [(buf, buf.detach().clone()) for m in self.module.modules()
                      if isinstance(m, nn.modules.batchnorm._NormBase) for buf in m.buffers()]
        return self

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for buf, value in self.saved:
                buf.copy_(value)
        self.saved = []


def run_stage(stage: nn.Module, x: torch.Tensor, enabled: bool) -> torch.Tensor:
    """Run `stage`, under non-reentrant activation checkpointing when enabled and gradients are needed."""
    if not (enabled and torch.is_grad_enabled()):
        return stage(x)

    def contexts() -> tuple[AbstractContextManager, AbstractContextManager]:
        return nullcontext(), _KeepNormStats(stage)

    return checkpoint(stage, x, use_reentrant=False, context_fn=contexts)


class OctModel(nn.Module):
    """Base of every registry model: maps (B, C_in, nB, D, W) volumes to (B, K, nB, W) logits.

    Subclasses set `name`, `encoder_prefixes` (state-dict key prefixes of the 3D encoder, for
    encoder-only weight transfer) and implement `shape_problems` and `project`.
    """

    name = "model"
    encoder_prefixes: tuple[str, ...] = ("encoder.",)

    def __init__(self, in_channels: int, out_channels: int, width: float, checkpointing: bool) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ModelError(f"{self.name}: in_channels={in_channels} and out_channels={out_channels} must be >= 1")
        if not width > 0:
            raise ModelError(f"{self.name}: width={width} must be > 0")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.width = width
        self.checkpointing = checkpointing

    @property
    def options(self) -> dict[str, Any]:
        """The build_model options that rebuild this model (stored with exported weights)."""
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "width": self.width,
                "checkpointing": self.checkpointing}

    def shape_problems(self, bscans: int, depth: int, ascans: int) -> list[str]:
        """Reasons why (nB, D, W) cannot pass through this model; empty when it can."""
        raise NotImplementedError

    def check_input_shape(self, shape: Sequence[int]) -> None:
        """Raise ModelError naming every dimension of `shape` (B, C, nB, D, W) that does not fit."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != 5:
            raise ModelError(f"input shape {shape} must be 5-D (B, C, nB, D, W) for {self.name}")
        problems = []
        if shape[1] != self.in_channels:
            problems.append(f"C={shape[1]} must equal in_channels={self.in_channels}")
        problems += self.shape_problems(*shape[2:])
        if problems:
            raise ModelError(f"input shape {shape} does not fit {self.name}: " + "; ".join(problems))

    def stage(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Run one encoder stage (checkpointed when the model was built with checkpointing=True)."""
        return run_stage(module, x, self.checkpointing and self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input_shape(x.shape)
        return self.project(x)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def multiple_problem(axis: str, value: int, multiple: int, model: str) -> list[str]:
    """['W=250 must be a multiple of 16 for fpn'] when value is not a positive multiple, else []."""
    if value < multiple or value % multiple:
        return [f"{axis}={value} must be a multiple of {multiple} for {model}"]
    return []


Builder = Callable[..., OctModel]
