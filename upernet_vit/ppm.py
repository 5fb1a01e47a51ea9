"""Pyramid Pooling Module (PSPNet), the context branch of UperNet on the coarsest map."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvNormAct, resize


class PyramidPoolingModule(nn.Module):
    """Global context at several grid sizes, fused back into the map.

    ``x [B, C_in, h, w]``; for each scale s: adaptive average pool to ``[B, C_in, s, s]`` -> 1x1
    ConvNormAct -> ``[B, C, s, s]`` -> bilinear back to ``[B, C, h, w]``. Then concat
    ``[x, p_1, ..., p_k]`` (``[B, C_in + k*C, h, w]``, mmseg/HF order) -> 3x3 ConvNormAct ->
    ``[B, C, h, w]``. Works for any h, w >= 1 (pooling a 1x1 map to 6x6 replicates it).
    """

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
        self.stages = nn.ModuleList(
            ConvNormAct(in_channels, channels, 1, norm) for _ in self.pool_scales
        )
        self.bottleneck = ConvNormAct(in_channels + len(self.pool_scales) * channels, channels, 3, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [
            resize(stage(F.adaptive_avg_pool2d(x, scale)), size)
            for scale, stage in zip(self.pool_scales, self.stages)
        ]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))
