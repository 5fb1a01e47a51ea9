"""Opt-in speed and memory paths for a built model: ``optimize(model, ...)``.

The core modules compute the reference math (resize, concat, conv). ``optimize`` swaps parts of a built
:class:`~upernet_vit.UperNetViT` or :class:`~upernet_vit.UperNetHead` in place for equivalents that are
faster or leaner; parameters and state-dict keys stay the same, outputs equal the reference within fp32
rounding (tests/fast/test_fast.py is the specification). Nothing in the core imports this package.
"""
from .fpn import LeanFPNFusion, recompute_resizes, split_conv
from .fuse_bn import fuse_conv_bn
from .optimize import optimize
from .winograd import WinogradConv2d, winograd_conv3x3

__all__ = [
    "LeanFPNFusion",
    "WinogradConv2d",
    "fuse_conv_bn",
    "optimize",
    "recompute_resizes",
    "split_conv",
    "winograd_conv3x3",
]
