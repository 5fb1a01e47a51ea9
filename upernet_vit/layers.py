"""Building blocks of the decoder: bilinear resize by size, the norm factory, conv-norm-act.

Every map is ``[B, C, H, W]``. Every resize goes to an explicit target size, never a scale factor, so odd
grids (37 x 37 tokens from a 518 px DINOv2 input, a 1 x 1 grid) stay exact; bilinear with
``align_corners=False``, as mmsegmentation and HuggingFace do.
"""
from __future__ import annotations

import typing
from typing import Sequence, Type

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from .config import Norm

NORM_NAMES: tuple[str, ...] = typing.get_args(Norm)


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear ``[B, C, h, w] -> [B, C, *size]`` (mmseg's ``resize``; exact at the same size)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def build_norm2d(norm: str, channels: int) -> nn.Module:
    """A norm layer for `[B, C, H, W]` maps.

    - ``"layernorm"``: LayerNorm over channels at every pixel. Independent of batch size and
      map size, so batch size 1 trains and a 1x1 pooled PPM map is fine. The default.
    - ``"groupnorm"``: GroupNorm with up to 32 groups of at least 8 channels (fewer groups where the
      channel count asks for it; one group below 16 channels), so any channel count works and a
      1x1 map still has several values per group.
    - ``"batchnorm"``: BatchNorm2d, as mmsegmentation and HuggingFace; needed to load their weights.
      It cannot train on a batch of one 1x1 map (the PPM's pool scale 1).
    - ``"none"``: identity (the conv before it then gets a bias).
    """
    if norm == "layernorm":
        return LayerNorm2d(channels)
    if norm == "groupnorm":
        return nn.GroupNorm(group_count(channels), channels)
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORM_NAMES)}")


def group_count(channels: int, max_groups: int = 32, min_group_size: int = 8) -> int:
    """Most groups (<= ``max_groups``) that divide ``channels`` with >= ``min_group_size`` channels each."""
    for groups in range(min(max_groups, channels // min_group_size), 1, -1):
        if channels % groups == 0:
            return groups
    return 1


class ConvNormAct(nn.Module):
    """Conv (no bias before a norm) -> norm -> activation: ``[B, C_in, H, W] -> [B, C_out, H, W]``.

    'Same' padding, stride 1. Submodule names ``conv``/``norm`` map one to one onto mmsegmentation's
    ``conv``/``bn`` and HuggingFace's ``conv``/``batch_norm`` (see :mod:`upernet_vit.convert`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        norm: str = "layernorm",
        act_layer: Type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=norm == "none"
        )
        self.norm = build_norm2d(norm, out_channels)
        # in place (as mmcv's ConvModule): the norm's backward needs its input, not its output
        self.act = act_layer(inplace=True) if act_layer is nn.ReLU else act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))
