"""UperNet's FPN fusion (Xiao et al. 2018, on Lin et al. 2017's FPN): one map at the finest level.

Inputs, finest first: ``features[i] [B, C_i, H_i, W_i]`` for the L-1 lower levels and
``top [B, C, H_top, W_top]`` (the PPM output, already C channels).

1. lateral 1x1 ConvNormAct per lower level -> ``[B, C, H_i, W_i]``; ``top`` is the last lateral.
2. top-down, coarse to fine: ``lateral[i-1] += resize(lateral[i])``, so each level holds all coarser ones.
3. fpn 3x3 ConvNormAct on each lower level (the top level gets none, as in mmseg/HF).
4. resize every level to the finest size, concat ``[level_0, ..., level_{L-2}, top]`` -> ``[B, L*C, H_0, W_0]``,
   3x3 ``fpn_bottleneck`` -> ``[B, C, H_0, W_0]``.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from .layers import ConvNormAct, resize


class FPNFusion(nn.Module):
    """``forward(features, top)`` -> ``[B, C, H_0, W_0]``; ``in_channels`` are the lower levels' C_i."""

    def __init__(self, in_channels: Sequence[int], channels: int, norm: str = "layernorm") -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(ConvNormAct(c, channels, 1, norm) for c in in_channels)
        self.fpn_convs = nn.ModuleList(ConvNormAct(channels, channels, 3, norm) for _ in in_channels)
        self.fpn_bottleneck = ConvNormAct((len(in_channels) + 1) * channels, channels, 3, norm)

    def forward(self, features: Sequence[torch.Tensor], top: torch.Tensor) -> torch.Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)] + [top]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        return self.fuse_levels(outs)

    def fuse_levels(self, outs: List[torch.Tensor]) -> torch.Tensor:
        """Step 4: L maps ``[B, C, H_i, W_i]``, finest first -> ``[B, C, H_0, W_0]``.

        (``upernet_vit.fast`` overrides this step with a form that never builds the concat.)
        """
        size = outs[0].shape[-2:]
        upsampled = [outs[0]] + [resize(out, size) for out in outs[1:]]
        return self.fpn_bottleneck(torch.cat(upsampled, dim=1))
