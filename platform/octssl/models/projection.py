"""3D-to-2D projections: the FPN's feature projection block and the depth poolings of the baselines.

Tensors here are (B, C, nB, D, W); every projection removes the depth axis (dim 3).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from octssl.models.blocks import ResidualUnit, conv_bn3d, residual_unit3d

DEPTH = 3  # the axial-depth dimension of a (B, C, nB, D, W) tensor


def depth_after_halvings(depth: int, halvings: int) -> int:
    """Depth left after `halvings` stride-2, padding-1, kernel-3 convs (each gives ceil(d / 2))."""
    return math.ceil(depth / 2**halvings)


class FeatureProjectionBlock(nn.Module):
    """FPB: n stride-2 depth convs in a residual unit, a depth-k conv (no padding), then mean over depth.

    The residual unit: n x (1x3x1 conv along depth, stride 2, + BN), ReLU between, shortcut a 1x1x1
    conv with depth stride 2^n + BN, ReLU after the sum. Then a (1, k, 1) conv + BN + ReLU. `mean=False`
    (ReSensNet) drops the final mean: the depth-k conv must then leave depth 1. Channels are unchanged.
    """

    def __init__(self, channels: int, halvings: int, kernel_depth: int = 4, mean: bool = True) -> None:
        super().__init__()
        self.halvings = halvings
        self.kernel_depth = kernel_depth
        self.mean = mean
        if halvings > 0:
            self.reduce: nn.Module = residual_unit3d(
                channels, channels, [(1, 3, 1)] * halvings, [(1, 2, 1)] * halvings,
                shortcut_stride=(1, 2**halvings, 1),
            )
        else:
            self.reduce = nn.Identity()
        self.squeeze = ResidualUnit([conv_bn3d(channels, channels, (1, kernel_depth, 1))], None, residual=False)

    def output_depth(self, depth: int) -> int:
        """Depth left after the depth-k conv for an input of this depth (<= 0: the input is too shallow)."""
        return depth_after_halvings(depth, self.halvings) - self.kernel_depth + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze(self.reduce(x))
        return x.mean(dim=DEPTH) if self.mean else x.squeeze(DEPTH)


def average_depth(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool depth by `factor` (Lachinov's projective skip connections)."""
    return nn.functional.avg_pool3d(x, kernel_size=(1, factor, 1), stride=(1, factor, 1))


def max_depth(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Unidirectional max-pooling along depth by `factor` (IPN's projection layer)."""
    return nn.functional.max_pool3d(x, kernel_size=(1, factor, 1), stride=(1, factor, 1))
