"""A leaner FPN fusion step: the same ``fpn_bottleneck`` of the resized, concatenated levels, computed
without building the concat and without keeping the upsampled levels for backward.

The reference step (:meth:`upernet_vit.fpn.FPNFusion.fuse_levels`) is
``conv3x3(cat([out_0, resize(out_1), ..., resize(out_{L-1})]))``: the concat ``[B, L*C, H/4, W/4]`` is the
largest tensor of the head, and the conv keeps it for backward. A conv is linear in its input
channels, so it equals the sum of one partial conv per level with that level's weight slice; and
bilinear upsampling is cheap, so backward can redo it from the small level instead of keeping the big
one. Same math, another summation order: equal to the reference within fp32 rounding.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import torch
from torch import nn

from ..fpn import FPNFusion
from ..layers import resize
from .winograd import WinogradConv2d, winograd_conv3x3


@contextmanager
def recompute_resizes(pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Within the block, autograd keeps the small source of each ``(source, resize(source))`` pair instead
    of the resized map, and redoes the resize in backward."""
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


def split_conv(conv: nn.Conv2d, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``conv(cat(parts, 1))`` as the sum of one partial conv per part (its slice of the weight)."""
    weights = conv.weight.split([p.shape[1] for p in parts], dim=1)
    out = conv._conv_forward(parts[0], weights[0], conv.bias)
    for part, weight in zip(parts[1:], weights[1:]):
        out = out.add_(conv._conv_forward(part, weight, None))  # in place: no conv keeps its output
    return out


class LeanFPNFusion(FPNFusion):
    """:class:`~upernet_vit.fpn.FPNFusion` whose last step never builds the concat and (while autograd
    records) keeps only the small levels for backward. With a
    :class:`~upernet_vit.fast.winograd.WinogradConv2d` bottleneck that runs, the Winograd kernel does
    both itself. Same parameters and state-dict keys; made by :func:`upernet_vit.fast.optimize`."""

    recompute_upsampled: bool = True  # False: only the Winograd kernel's own lean form, else the reference

    def fuse_levels(self, outs: List[torch.Tensor]) -> torch.Tensor:
        block = self.fpn_bottleneck
        size = outs[0].shape[-2:]
        conv = block.conv
        if isinstance(conv, WinogradConv2d) and conv.use_winograd(outs[0], size):
            y = winograd_conv3x3(outs, conv.weight, conv.bias, size=size)
        elif not self.recompute_upsampled:
            return super().fuse_levels(outs)
        else:
            upsampled = [outs[0]] + [resize(out, size) for out in outs[1:]]
            if not torch.is_grad_enabled() or torch.compiler.is_compiling():  # nothing kept / compile plans memory
                y = split_conv(conv, upsampled)
            else:
                with recompute_resizes(list(zip(outs, upsampled))):
                    y = split_conv(conv, upsampled)
        return block.act(block.norm(y))
