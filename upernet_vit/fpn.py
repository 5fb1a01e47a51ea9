"""UperNet's FPN fusion: laterals, cumulative top-down adds, fpn convs, concat at the finest level."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .layers import ConvNormAct
from .sizes import resize


class FPNFusion(nn.Module):
    """Fuse a feature pyramid into one map at the finest level.

    Inputs, finest first: ``features[i] [B, C_i, H_i, W_i]`` for the L-1 lower levels and
    ``top [B, C, H_top, W_top]`` (the PPM output, already ``C`` channels).

    1. 1x1 lateral ConvNormAct per lower level -> ``[B, C, H_i, W_i]``; ``top`` is the last lateral.
    2. Top-down: ``lateral[i-1] += resize(lateral[i])`` from coarse to fine, so every level
       accumulates all coarser ones.
    3. 3x3 fpn ConvNormAct on each lower level (the top level gets none, as in mmseg/HF).
    4. Resize all to the finest size, concat ``[level_0, ..., level_{L-2}, top]`` ->
       ``[B, L*C, H_0, W_0]`` -> 3x3 ``fpn_bottleneck`` -> ``[B, C, H_0, W_0]``. The concat is never
       built: ``fpn_bottleneck`` gets the list and sums one partial conv per level (same result, and
       an ``L*C``-channel map less in memory, the largest tensor of the head). It also gets the levels
       before their upsampling, with the target size: in training the upsampled maps are then not
       kept for backward, their resize is redone there (see :meth:`ConvNormAct.forward`).

    ``winograd`` runs the 3x3 convs by F(2x2, 3x3) on CPU (see :mod:`upernet_vit.winograd`).
    """

    def __init__(
        self, in_channels: Sequence[int], channels: int, norm: str = "layernorm", winograd: bool = True
    ) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(ConvNormAct(c, channels, 1, norm) for c in in_channels)
        self.fpn_convs = nn.ModuleList(
            ConvNormAct(channels, channels, 3, norm, winograd=winograd) for _ in in_channels
        )
        self.fpn_bottleneck = ConvNormAct((len(in_channels) + 1) * channels, channels, 3, norm, winograd=winograd)

    def forward(self, features: Sequence[torch.Tensor], top: torch.Tensor) -> torch.Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)] + [top]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        return self.fpn_bottleneck(outs, size=outs[0].shape[-2:])
