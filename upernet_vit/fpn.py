"""UperNet's FPN fusion: laterals, cumulative top-down adds, fpn convs, concat at the finest level."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterator, Sequence, Tuple

import torch
from torch import nn

from .layers import ConvNormAct, resize


@contextmanager
def recompute_resizes(pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Within the block, autograd keeps the small source of each ``(source, resize(source))`` pair instead
    of the resized map and redoes the resize in backward.

    The upsampled pyramid levels are among the largest tensors of the head (``[B, C, H/4, W/4]`` each)
    while bilinear upsampling is cheap, so recomputing them trades almost no time for memory.
    """
    def key(t: torch.Tensor) -> Tuple[Any, ...]:
        return t.data_ptr(), t.shape, t.stride(), t.dtype

    sources: Dict[Tuple[Any, ...], torch.Tensor] = {key(big): small for small, big in pairs if big is not small}
    size = pairs[0][1].shape[-2:]

    def pack(t: torch.Tensor) -> Any:
        small = sources.get(key(t))
        return t if small is None else ("resize", small)

    def unpack(saved: Any) -> torch.Tensor:
        if isinstance(saved, tuple):
            with torch.no_grad():
                return resize(saved[1], size)
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


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
       an ``L*C``-channel map less in memory, the largest tensor of the head). In training the
       upsampled levels are not kept for backward either; their resize is redone there
       (:func:`recompute_resizes`).

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
        size = outs[0].shape[-2:]
        parts = [resize(o, size) for o in outs]
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():  # nothing saved / compile plans memory
            return self.fpn_bottleneck(parts)
        with recompute_resizes(list(zip(outs, parts))):
            return self.fpn_bottleneck(parts)
