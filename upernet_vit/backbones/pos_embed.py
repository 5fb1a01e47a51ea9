"""Absolute position-embedding resampling as each family's official code does it.

timm resamples ``pos_embed`` to the token grid by target size with antialiasing. The official
implementations differ, and the difference is visible in the features at any non-native size:

- ``"timm"``: bicubic to the target size, antialias on (timm; also DINOv2 *with registers*).
- ``"dino"``: bicubic by *scale factor* ``(grid + 0.1) / native``, no antialias, skipped when the grid
  is the native square (DINO, DINOv2 without registers, VisionFM).
- ``"mae"``: bicubic to the target size, no antialias (MAE's ``interpolate_pos_embed``; RETFound).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

POS_EMBED_MODES = ("timm", "dino", "mae")


def resample_patch_pos_embed(patch_pos: torch.Tensor, grid: Sequence[int], mode: str) -> torch.Tensor:
    """``[1, M*M, D]`` (native M x M grid) -> ``[1, h*w, D]`` for ``grid = (h, w)``."""
    n, dim = patch_pos.shape[1], patch_pos.shape[2]
    native = int(math.isqrt(n))
    if native * native != n:
        raise ValueError(f"pos_embed has {n} patch positions, not a square grid")
    h, w = int(grid[0]), int(grid[1])
    if (h, w) == (native, native):
        return patch_pos
    orig_dtype = patch_pos.dtype
    x = patch_pos.float().reshape(1, native, native, dim).permute(0, 3, 1, 2)
    if mode == "dino":
        scale = ((h + 0.1) / native, (w + 0.1) / native)
        x = F.interpolate(x, scale_factor=scale, mode="bicubic", antialias=False)
        if tuple(x.shape[-2:]) != (h, w):
            raise RuntimeError(f"offset interpolation gave {tuple(x.shape[-2:])}, expected {(h, w)}")
    elif mode in ("mae", "timm"):
        x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=mode == "timm")
    else:
        raise ValueError(f"unknown pos-embed interpolation {mode!r}; choose one of {', '.join(POS_EMBED_MODES)}")
    return x.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(orig_dtype)


class OfficialPosEmbedViT(VisionTransformer):
    """timm's VisionTransformer whose ``pos_embed`` is resampled by ``pos_embed_interpolation`` (see the
    module docstring) instead of timm's rule. Weights and every other computation are timm's."""

    pos_embed_interpolation: str = "timm"

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, h, w, D]`` patch embeddings -> ``[B, prefix + h*w, D]`` tokens with positions."""
        batch, h, w, dim = x.shape
        x = x.reshape(batch, h * w, dim)
        prefix = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(batch, -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(batch, -1, -1))
        if self.pos_embed is None:
            return self.pos_drop(torch.cat(prefix + [x], dim=1))
        if self.no_embed_class:  # pos_embed covers the patches only; prefix tokens carry their own
            x = x + self.resample_pos_embed(self.pos_embed, (h, w))
            return self.pos_drop(torch.cat(prefix + [x], dim=1))
        # pos_embed = [cls position, patch positions]; registers (if any) get none
        n_pos_prefix = self.pos_embed.shape[1] - self.patch_embed.num_patches
        patch_pos = self.resample_pos_embed(self.pos_embed[:, n_pos_prefix:], (h, w))
        pos = torch.cat([self.pos_embed[:, :n_pos_prefix], patch_pos], dim=1)
        return self.pos_drop(torch.cat(prefix + [x], dim=1) + pos)

    def resample_pos_embed(self, patch_pos: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """``[1, M*M, D] -> [1, h*w, D]``; the export formulation overrides it (upernet_vit.export)."""
        return resample_patch_pos_embed(patch_pos, grid, self.pos_embed_interpolation)


def use_pos_embed_interpolation(vit: torch.nn.Module, mode: str) -> None:
    """Make a timm ``VisionTransformer`` resample ``pos_embed`` the way ``mode`` says (in place)."""
    if mode not in POS_EMBED_MODES:
        raise ValueError(f"unknown pos-embed interpolation {mode!r}; choose one of {', '.join(POS_EMBED_MODES)}")
    if mode == "timm" or not isinstance(vit, VisionTransformer):
        return
    if not getattr(vit, "dynamic_img_size", False):
        raise ValueError("official pos-embed interpolation needs a model built with dynamic_img_size=True")
    vit.__class__ = OfficialPosEmbedViT  # same module, only _pos_embed differs
    vit.pos_embed_interpolation = mode
