"""``optimize``: the one entry point of the fast paths, and the one place their defaults are decided.

``optimize(model)`` with no arguments is what ``upernet-vit train`` and ``predict`` run, for the device the
model is on and the mode it is in (docs/explanation/performance.md; the measurements behind each default are in docs/results.md).
"""
from __future__ import annotations

from typing import List, Optional, TypeVar, Union

import torch
from torch import nn

from ..fpn import FPNFusion
from ..head import UperNetHead
from ..model import UperNetViT
from .fpn import LeanFPNFusion
from .fuse_bn import fuse_conv_bn
from .winograd import WinogradConv2d

M = TypeVar("M", bound=Union[UperNetViT, UperNetHead])


def optimize(
    module: M,
    *,
    channels_last: Optional[bool] = None,
    fuse_bn: bool = False,
    recompute_upsampled: bool = True,
    winograd: bool = False,
) -> M:
    """Switch the fast paths of an ``UperNetViT`` or ``UperNetHead`` on or off, in place; returns ``module``.

    Each flag says the state the head ends in, so ``optimize(model, winograd=False)`` also undoes an
    earlier ``winograd=True``. Call it after ``model.to(device)`` and ``model.train()``/``.eval()``: the
    ``channels_last`` default depends on both.

    - ``channels_last``: head conv weights in NHWC memory, so the head's convs run in NHWC (other kernels,
      same values up to rounding). ``None`` (default): on for a model in eval mode on the CPU, where it was
      measured faster on both CPUs tried; off in training (1.2-1.9x slower on an AMD EPYC) and on CUDA
      (not yet measured there).
    - ``fuse_bn``: fold BatchNorm into the convs (``norm="batchnorm"`` models; eval mode only; not
      undoable, so save the unfused model for training or sharing).
    - ``recompute_upsampled``: the FPN's last step never builds the ``[B, L*C, H/4, W/4]`` concat and, in
      training, keeps only the small levels for backward (:mod:`upernet_vit.fast.fpn`). Less memory on
      any device; another summation order.
    - ``winograd``: the FPN's 3x3 convs by Winograd F(2x2, 3x3) (:mod:`upernet_vit.fast.winograd`), used
      only for fp32 on CPU in eager mode on large maps. 2.25x fewer multiplies; whether that is faster
      depends on the CPU (docs/results.md), so it is off unless asked.
    """
    if isinstance(module, UperNetViT):
        heads: List[UperNetHead] = [module.head]
    elif isinstance(module, UperNetHead):
        heads = [module]
    else:
        raise TypeError(f"optimize() takes an UperNetViT or an UperNetHead, got {type(module).__name__}")
    if channels_last is None:
        device = next(module.parameters()).device
        channels_last = device.type == "cpu" and not module.training
    if fuse_bn:
        if module.training:
            raise RuntimeError("optimize(fuse_bn=True) folds BatchNorm running statistics: call model.eval() first")
        fuse_conv_bn(module)
    lean = recompute_upsampled or winograd
    for head in heads:
        fpn = head.fpn
        if type(fpn) in (FPNFusion, LeanFPNFusion):
            fpn.__class__ = LeanFPNFusion if lean else FPNFusion
            if lean:
                fpn.recompute_upsampled = recompute_upsampled
        elif lean:
            raise TypeError(
                f"optimize() swaps FPNFusion's last step, but head.fpn is a {type(fpn).__name__}; "
                "pass recompute_upsampled=False, winograd=False to keep it"
            )
        for block in [*fpn.fpn_convs, fpn.fpn_bottleneck]:
            if winograd:
                WinogradConv2d.convert(block.conv)
            elif isinstance(block.conv, WinogradConv2d):
                block.conv.__class__ = nn.Conv2d
        head.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return module
