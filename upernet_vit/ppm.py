"""Pyramid Pooling Module (PSPNet), the context branch of UperNet on the coarsest map."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvNormAct
from .sizes import is_exporting, resize


def adaptive_avg_pool2d_any_size(x: torch.Tensor, size: int) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, size)`` for ``x [B, C, h, w]`` as ``A_h @ x @ A_w^T``, with averaging
    matrices ``A_n [size, n]`` built from the run-time n, so an exported graph pools any size. Bin i holds
    torch's rows ``floor(i*n/size) <= j < ceil((i+1)*n/size)``, i.e. ``i*n < (j+1)*size`` and
    ``j*size < (i+1)*n``. Equal up to float rounding. (The decomposition of the ATen op that the exporters
    use lays the bins out for the example size: wrong at any other.)
    """
    if size == 1:
        return x.mean((-2, -1), keepdim=True)

    def averaging_matrix(n: int) -> torch.Tensor:
        i = torch.arange(size, device=x.device).unsqueeze(1)
        j = torch.arange(n, device=x.device)
        inside = ((i * n < (j + 1) * size) & (j * size < (i + 1) * n)).to(x.dtype)
        return inside / inside.sum(1, keepdim=True)

    return averaging_matrix(x.shape[-2]) @ x @ averaging_matrix(x.shape[-1]).transpose(0, 1)


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
        pool = adaptive_avg_pool2d_any_size if is_exporting() else F.adaptive_avg_pool2d
        pooled = [
            resize(stage(pool(x, scale)), size)
            for scale, stage in zip(self.pool_scales, self.stages)
        ]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))
