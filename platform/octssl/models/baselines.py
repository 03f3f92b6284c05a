"""The paper's 3D-to-2D baselines: Lachinov et al. (projective skips), IPN (max-pool projection), 2D U-Net.

Tensors are (B, C, nB, D, W); kernels are written in (nB, D, W) order.
"""

from __future__ import annotations

import torch
from torch import nn

from octssl.models.blocks import (
    BatchNorm2d,
    InstanceNorm3d,
    OctModel,
    conv_bn2d,
    multiple_problem,
    residual_block2d,
    residual_unit3d,
    scaled,
)
from octssl.models.projection import DEPTH, average_depth, max_depth

Triple = tuple[int, int, int]


class Bottleneck(nn.Module):
    """Lachinov's residual bottleneck: 1x1x1 (C -> C/8), k, 1x1x1 (-> C), InstanceNorm, x + out (no final ReLU)."""

    def __init__(self, channels: int, kernel: Triple) -> None:
        super().__init__()
        inner = channels // 8
        padding = (kernel[0] // 2, kernel[1] // 2, kernel[2] // 2)
        self.body = nn.Sequential(
            nn.Conv3d(channels, inner, 1, bias=False), InstanceNorm3d(inner), nn.ReLU(),
            nn.Conv3d(inner, inner, kernel, padding=padding, bias=False), InstanceNorm3d(inner), nn.ReLU(),
            nn.Conv3d(inner, channels, 1, bias=False), InstanceNorm3d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Lachinov(OctModel):
    """Lachinov et al. 2021: U-Net with projective skip connections (1,513,697 parameters at width 1).

    Encoder: a (3,1,3) stem conv (across B-scans and A-scans) + IN, then stages of strided (1,2,2)
    downsampling (never across B-scans) and bottleneck blocks (repeats 1, 1, 2, 4; channels 32..256).
    Skip tensors are average-pooled in depth to the bottleneck's depth (D/8); the decoder upsamples W
    only (a 1x1x1 conv then linear interpolation, which commute), runs a 3x3x3 conv + IN and bottleneck
    blocks with (3,1,3) kernels; the mean over depth comes only at the end, before a (3,3) en-face head.
    The reference code also builds a fourth decoder stage that forward never uses; it is not built here.
    """

    name = "lachinov"
    repeats = (1, 1, 2, 4)

    def __init__(self, in_channels: int = 1, out_channels: int = 1, width: float = 1.0,
                 checkpointing: bool = False) -> None:
        super().__init__(in_channels, out_channels, width, checkpointing)
        channels = [scaled(32 * 2**i, width, multiple=8) for i in range(len(self.repeats))]
        self.levels = len(channels)
        stem = [nn.Conv3d(in_channels, channels[0], (3, 1, 3), padding=(1, 0, 1)), InstanceNorm3d(channels[0])]
        stem += [Bottleneck(channels[0], (1, 3, 3)) for _ in range(self.repeats[0])]
        self.encoder = nn.ModuleList([nn.Sequential(*stem)])
        for i in range(1, self.levels):
            down = nn.Conv3d(channels[i - 1], channels[i], (1, 2, 2), stride=(1, 2, 2), bias=False)
            self.encoder.append(nn.Sequential(down, *(Bottleneck(channels[i], (1, 3, 3)) for _ in range(self.repeats[i]))))
        self.upsample = nn.ModuleList(
            nn.Conv3d(channels[i + 1], channels[i], 1, bias=False) for i in range(self.levels - 1)
        )
        self.decoder = nn.ModuleList(
            nn.Sequential(
                nn.Conv3d(2 * channels[i], channels[i], 3, padding=1, bias=False), InstanceNorm3d(channels[i]),
                *(Bottleneck(channels[i], (3, 1, 3)) for _ in range(self.repeats[i])),
            )
            for i in range(self.levels - 1)
        )
        self.head = nn.Conv2d(channels[0], out_channels, 3, padding=1)

    def shape_problems(self, bscans: int, depth: int, ascans: int) -> list[str]:
        factor = 2 ** (self.levels - 1)
        problems = multiple_problem("W", ascans, factor, self.name)
        if depth < factor:
            problems.append(f"D={depth} must be >= {factor} for {self.name}")
        return problems

    def project(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, stage in enumerate(self.encoder):
            x = self.stage(stage, x)
            if i < self.levels - 1:
                skips.append(average_depth(x, 2 ** (self.levels - 1 - i)))
        for i in reversed(range(self.levels - 1)):
            x = nn.functional.interpolate(self.upsample[i](x), size=skips[i].shape[2:], mode="trilinear")
            x = self.decoder[i](torch.cat([skips[i], x], dim=1))
        return self.head(x.mean(dim=DEPTH))


class IPN(OctModel):
    """Image projection network (Li et al. 2020): 3x3x3 conv pairs with unidirectional depth max-pooling.

    Four stages of two 3x3x3 conv + BN + ReLU (channels 16, 32, 64, 128), max-pooling depth by 4, 4 and 2
    between them and over all remaining depth after the last; no en-face downsampling. Then a 3x3 en-face
    conv + BN + ReLU and a 1x1 head.
    """

    name = "ipn"
    depth_pools = (4, 4, 2)

    def __init__(self, in_channels: int = 1, out_channels: int = 1, width: float = 1.0,
                 checkpointing: bool = False) -> None:
        super().__init__(in_channels, out_channels, width, checkpointing)
        channels = [scaled(c, width) for c in (16, 32, 64, 128)]
        self.encoder = nn.ModuleList(
            residual_unit3d(in_channels if k == 0 else channels[k - 1], c, [(3, 3, 3), (3, 3, 3)], shortcut="none")
            for k, c in enumerate(channels)
        )
        self.decoder = nn.Sequential(conv_bn2d(channels[-1], channels[-1], 3), nn.ReLU(inplace=True))
        self.head = nn.Conv2d(channels[-1], out_channels, 1)

    def shape_problems(self, bscans: int, depth: int, ascans: int) -> list[str]:
        factor = 1
        for pool in self.depth_pools:
            factor *= pool
        return [f"D={depth} must be >= {factor} for {self.name}"] if depth < factor else []

    def project(self, x: torch.Tensor) -> torch.Tensor:
        for k, stage in enumerate(self.encoder):
            x = self.stage(stage, x)
            if k < len(self.depth_pools):
                x = max_depth(x, self.depth_pools[k])
        return self.head(self.decoder(x.amax(dim=DEPTH)))


class UNet2d(OctModel):
    """The naive baseline: a 2D residual U-Net on the mean over depth (the en-face mean projection).

    Same channels (16..256), en-face pooling schedule and decoder as the FPN, with 2D residual blocks
    (two 3x3 convs + BN) as encoder levels.
    """

    name = "unet2d"
    encoder_prefixes = ("input_norm.", "encoder.")
    pools = ((1, 2), (1, 2), (2, 2), (2, 2))

    def __init__(self, in_channels: int = 1, out_channels: int = 1, width: float = 1.0,
                 checkpointing: bool = False) -> None:
        super().__init__(in_channels, out_channels, width, checkpointing)
        channels = [scaled(c, width) for c in (16, 32, 64, 128, 256)]
        self.input_norm = BatchNorm2d(in_channels)
        self.encoder = nn.ModuleList()
        for k, c in enumerate(channels):
            block = residual_block2d(in_channels if k == 0 else channels[k - 1], c)
            self.encoder.append(nn.Sequential(nn.MaxPool2d(self.pools[k - 1]), block) if k else block)
        self.decoder = nn.ModuleList(
            residual_block2d(channels[k] + channels[k + 1], channels[k]) for k in range(len(channels) - 1)
        )
        self.head = nn.Conv2d(channels[0], out_channels, kernel_size=1)

    def shape_problems(self, bscans: int, depth: int, ascans: int) -> list[str]:
        return multiple_problem("W", ascans, 16, self.name) + multiple_problem("nB", bscans, 4, self.name)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        # The depth mean of z-scored B-scans is near zero everywhere: renormalise it before the U-Net.
        x = self.input_norm(x.mean(dim=DEPTH))
        features = []
        for stage in self.encoder:
            x = self.stage(stage, x)
            features.append(x)
        for k in reversed(range(len(self.decoder))):
            skip = features[k]
            x = nn.functional.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = self.decoder[k](torch.cat([skip, x], dim=1))
        return self.head(x)
