"""UperNet decode head (Xiao et al. 2018) and the optional auxiliary FCN head.

    features (finest first)  ->  PPM on the coarsest  ->  FPN fusion at the finest level
                             ->  dropout -> 1x1 classifier  ->  logits [B, K, H_0, W_0]

The math of mmseg ``UPerHead`` and HF ``UperNetHead``; their weights load by name (:mod:`upernet_vit.convert`).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
from torch import nn

from .fpn import FPNFusion
from .layers import ConvNormAct
from .ppm import PyramidPoolingModule


def init_classifier(conv: nn.Conv2d) -> None:
    """Small-normal weights, zero bias (mmseg's ``conv_seg`` init): near-uniform class scores at start."""
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)


class FCNHead(nn.Module):
    """Auxiliary head (mmseg ``FCNHead``/HF ``UperNetFCNHead`` with one conv, no input concat).

    ``[B, C_in, h, w]`` -> ``num_convs`` 3x3 ConvNormAct -> dropout -> 1x1 classifier ->
    ``[B, num_classes, h, w]``. Used only as a training signal on an intermediate level.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        num_convs: int = 1,
        norm: str = "layernorm",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            *(ConvNormAct(in_channels if i == 0 else channels, channels, 3, norm) for i in range(num_convs))
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        init_classifier(self.classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.convs(x)))


class UperNetHead(nn.Module):
    """UperNet (Xiao et al., 2018) on a feature pyramid; the math of mmseg ``UPerHead``/HF ``UperNetHead``.

    ``forward(features)`` takes L maps, finest first, ``features[i] [B, in_channels[i], H_i, W_i]``
    (for UperNetViT: strides 4, 8, 16, 32). PPM runs on the coarsest map, FPN fuses everything at the
    finest level, then dropout and a 1x1 classifier give logits ``[B, num_classes, H_0, W_0]``.

    With ``aux_head=True`` an :class:`FCNHead` on ``features[aux_in_index]`` is built;
    ``forward(features, return_aux=True)`` returns ``(logits, aux_logits)`` with the aux logits at
    that level's size.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int = 512,
        num_classes: int = 2,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        norm: str = "layernorm",
        dropout: float = 0.1,
        aux_head: bool = False,
        aux_channels: int = 256,
        aux_in_index: int = 2,
    ) -> None:
        super().__init__()
        if len(in_channels) < 2:
            raise ValueError(f"UperNetHead needs at least 2 levels, got in_channels={list(in_channels)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.in_channels = tuple(int(c) for c in in_channels)
        self.channels = channels
        self.num_classes = num_classes
        self.ppm = PyramidPoolingModule(self.in_channels[-1], channels, pool_scales, norm)
        self.fpn = FPNFusion(self.in_channels[:-1], channels, norm)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        init_classifier(self.classifier)
        self.aux_in_index = aux_in_index
        self.aux_head = (
            FCNHead(self.in_channels[aux_in_index], num_classes, aux_channels, norm=norm, dropout=dropout)
            if aux_head
            else None
        )

    def forward(
        self, features: Sequence[torch.Tensor], return_aux: bool = False
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        self._check_features(features)
        fused = self.fpn(features[:-1], self.ppm(features[-1]))
        logits = self.classifier(self.dropout(fused))
        if not return_aux:
            return logits
        if self.aux_head is None:
            raise ValueError("return_aux=True but this head was built without aux_head; pass aux_head=True")
        return logits, self.aux_head(features[self.aux_in_index])

    def _check_features(self, features: Sequence[torch.Tensor]) -> None:
        got: List[int] = [f.shape[1] if f.ndim == 4 else -1 for f in features]
        if got != list(self.in_channels):
            shapes = [tuple(f.shape) for f in features]
            raise ValueError(
                f"UperNetHead expects {len(self.in_channels)} maps [B, C, H, W] with C = "
                f"{list(self.in_channels)} (finest first), got shapes {shapes}"
            )
