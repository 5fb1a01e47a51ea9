"""Fold BatchNorm into the conv before it, for inference (eval statistics; same outputs up to rounding)."""
from __future__ import annotations

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..layers import ConvNormAct


def fuse_conv_bn(module: nn.Module) -> None:
    """In place: every ``ConvNormAct`` with BatchNorm, and every (transposed) conv directly followed by a
    BatchNorm in an ``nn.Sequential``, becomes one conv with the BN folded in; the BN becomes Identity."""
    for child in module.modules():
        if isinstance(child, ConvNormAct) and isinstance(child.norm, nn.BatchNorm2d):
            child.conv = fuse_conv_bn_eval(child.conv, child.norm)
            child.norm = nn.Identity()
        elif isinstance(child, nn.Sequential):
            for i in range(len(child) - 1):
                conv, bn = child[i], child[i + 1]
                if isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)) and isinstance(bn, nn.BatchNorm2d):
                    child[i] = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, nn.ConvTranspose2d))
                    child[i + 1] = nn.Identity()
