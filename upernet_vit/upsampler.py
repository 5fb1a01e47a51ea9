"""From the head's stride-4 logits ``[B, K, H/4, W/4]`` to full resolution ``[B, K, H, W]``.

- ``bilinear`` (mmseg/HF): one bilinear resize by size. No parameters.
- ``progressive``: two learned 2x stages (stride 4 -> 2 -> 1), each bilinear then a residual 3x3 conv
  refinement whose last conv starts at zero, so training starts from exactly bilinear and adds detail.
"""
from __future__ import annotations

import typing
from typing import Sequence, Tuple

import torch
from torch import nn

from .config import Upsampler
from .layers import build_norm2d, resize

UPSAMPLER_NAMES: Tuple[str, ...] = typing.get_args(Upsampler)


class BilinearUpsampler(nn.Module):
    """``[B, K, h, w] -> [B, K, *size]`` by bilinear interpolation (mmseg/HF default). No parameters."""

    def forward(self, logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return resize(logits, size)


class RefineStage(nn.Module):
    """One learned 2x stage: bilinear to ``size``, then a residual 3x3 conv refinement.

    ``[B, K, h, w] -> [B, K, *size]``: ``y = up(x) + conv(GELU(norm(conv(up(x)))))``. The last conv
    starts at zero, so an untrained stage is exactly bilinear and training only adds detail.
    """

    def __init__(self, channels: int, hidden_channels: int = 32, norm: str = "layernorm") -> None:
        super().__init__()
        self.refine = nn.Sequential(
            nn.Conv2d(channels, hidden_channels, 3, padding=1, bias=norm == "none"),
            build_norm2d(norm, hidden_channels),
            nn.GELU(),
            nn.Conv2d(hidden_channels, channels, 3, padding=1),
        )
        nn.init.zeros_(self.refine[-1].weight)
        nn.init.zeros_(self.refine[-1].bias)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        x = resize(x, size)
        return x + self.refine(x)


class ProgressiveUpsampler(nn.Module):
    """Two learned 2x stages, stride 4 -> 2 -> 1: ``[B, K, h, w] -> [B, K, *size]``.

    The intermediate size is half the target, rounded up, so any target size works.
    """

    def __init__(self, num_classes: int, hidden_channels: int = 32, norm: str = "layernorm") -> None:
        super().__init__()
        self.stages = nn.ModuleList(RefineStage(num_classes, hidden_channels, norm) for _ in range(2))

    def forward(self, logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        half = [(s + 1) // 2 for s in size]
        return self.stages[1](self.stages[0](logits, half), size)


def build_upsampler(name: str, num_classes: int, norm: str = "layernorm") -> nn.Module:
    if name == "bilinear":
        return BilinearUpsampler()
    if name == "progressive":
        return ProgressiveUpsampler(num_classes, norm=norm)
    raise ValueError(f"unknown upsampler {name!r}; choose one of {', '.join(UPSAMPLER_NAMES)}")
