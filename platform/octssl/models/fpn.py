"""The paper's feature projection network (FPN) and ReSensNet: 3D residual encoder, one FPB per level, 2D decoder.

Layer for layer as in Morano et al. 2023 (summarised in docs/models.md). The paper writes tensors as
C x nB x W x D; here they stay (B, C, nB, D, W) as the data arrives, so no permute is needed: kernels are written in (nB, D, W) order
(the paper's 1x1x3 depth conv is (1, 3, 1) here; 1x3x3 and 3x1x1 are symmetric in W and D).
"""

from __future__ import annotations

import torch
from torch import nn

from octssl.models.blocks import OctModel, multiple_problem, residual_block2d, residual_unit3d, scaled
from octssl.models.projection import FeatureProjectionBlock

CHANNELS = (16, 32, 64, 128, 256)
# Max-pooling before levels 2..5 in (nB, D, W): within B-scans twice, then across B-scans too.
POOLS = ((1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2))


def encoder_level(c_in: int, c_out: int) -> nn.Sequential:
    """Block A (two 1x3x3 convs, 1x1x1 conv+BN shortcut) then block B (two 1x3x3 + one 3x1x1, identity)."""
    return nn.Sequential(
        residual_unit3d(c_in, c_out, [(1, 3, 3), (1, 3, 3)]),
        residual_unit3d(c_out, c_out, [(1, 3, 3), (1, 3, 3), (3, 1, 1)]),
    )


class FPN(OctModel):
    """Feature projection network: 4,369,553 trainable parameters at width 1 with one output."""

    name = "fpn"
    kernel_depth = 4
    mean_projection = True

    def __init__(self, in_channels: int = 1, out_channels: int = 1, width: float = 1.0,
                 checkpointing: bool = False) -> None:
        super().__init__(in_channels, out_channels, width, checkpointing)
        channels = [scaled(c, width) for c in CHANNELS]
        levels = len(channels)
        self.encoder = nn.ModuleList()
        for k, c_out in enumerate(channels):
            c_in = in_channels if k == 0 else channels[k - 1]
            stage = encoder_level(c_in, c_out)
            if k > 0:
                stage = nn.Sequential(nn.MaxPool3d(POOLS[k - 1]), *stage)
            self.encoder.append(stage)
        self.projections = nn.ModuleList(
            FeatureProjectionBlock(c, levels - 1 - k, self.kernel_depth, self.mean_projection)
            for k, c in enumerate(channels)
        )
        self.decoder = nn.ModuleList(
            residual_block2d(channels[k] + channels[k + 1], channels[k]) for k in range(levels - 1)
        )
        self.head = nn.Conv2d(channels[0], out_channels, kernel_size=1)

    def level_depths(self, depth: int) -> list[int]:
        """Depth reaching each level's FPB (max-pooling floors)."""
        depths = [depth]
        for _ in POOLS:
            depths.append(depths[-1] // 2)
        return depths

    def shape_problems(self, bscans: int, depth: int, ascans: int) -> list[str]:
        problems = multiple_problem("W", ascans, 16, self.name) + multiple_problem("nB", bscans, 4, self.name)
        left = [fpb.output_depth(d)  # type: ignore[operator]  # nn.ModuleList items are typed as Tensor | Module
                for fpb, d in zip(self.projections, self.level_depths(depth), strict=True)]
        if self.mean_projection and min(left) < 1:
            problems.append(f"D={depth} must be >= 64 for {self.name} (D/16 >= 4 for its depth-4 projection kernel)")
        if not self.mean_projection and any(d != 1 for d in left):
            problems.append(f"D={depth} must be 128 for {self.name} (its depth-{self.kernel_depth} projection "
                            f"kernel must leave depth 1 at every level; it leaves {left})")
        return problems

    def project(self, x: torch.Tensor) -> torch.Tensor:
        features = []
        for stage in self.encoder:
            x = self.stage(stage, x)
            features.append(x)
        enface = [self.stage(fpb, f) for fpb, f in zip(self.projections, features, strict=True)]
        y = enface[-1]
        for k in reversed(range(len(self.decoder))):
            skip = enface[k]
            y = nn.functional.interpolate(y, size=skip.shape[-2:], mode="nearest")
            y = self.decoder[k](torch.cat([skip, y], dim=1))
        return self.head(y)


class ReSensNet(FPN):
    """ReSensNet (Seeböck et al. 2022): the FPN with a depth-8 kernel and no final mean (D must be 128)."""

    name = "resensnet"
    kernel_depth = 8
    mean_projection = False
