"""Pyramid Pooling Module (PSPNet, Zhao et al. 2017): UperNet's context branch on the coarsest map.

For ``x [B, C_in, h, w]`` and each pool scale s (default 1, 2, 3, 6):

    p_s = resize(ConvNormAct_1x1(adaptive_avg_pool(x, s)), (h, w))     [B, C, h, w]

then ``ConvNormAct_3x3(cat([x, p_1, ..., p_k]))`` -> ``[B, C, h, w]``. Scale 1 is global context (one
value per channel, broadcast); larger scales keep coarse layout. The concat order is mmseg's and HF's.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvNormAct, resize


class PyramidPoolingModule(nn.Module):
    """``[B, C_in, h, w] -> [B, C, h, w]`` for any h, w >= 1 (pooling a 1x1 map to 6x6 replicates it)."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        norm: str = "layernorm",
    ) -> None:
        super().__init__()
        if not pool_scales or any(int(s) < 1 for s in pool_scales):
            raise ValueError(f"pool_scales must be positive integers, got {list(pool_scales)}")
        self.pool_scales = tuple(int(s) for s in pool_scales)
        self.stages = nn.ModuleList(ConvNormAct(in_channels, channels, 1, norm) for _ in self.pool_scales)
        self.bottleneck = ConvNormAct(in_channels + len(self.pool_scales) * channels, channels, 3, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [resize(stage(self.pool(x, scale)), size) for scale, stage in zip(self.pool_scales, self.stages)]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))

    def pool(self, x: torch.Tensor, scale: int) -> torch.Tensor:
        """``[B, C, h, w] -> [B, C, scale, scale]``; the export formulation overrides it (upernet_vit.export)."""
        return F.adaptive_avg_pool2d(x, scale)
