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

from ..sizes import is_exporting

POS_EMBED_MODES = ("timm", "dino", "mae")


def _bicubic_matrix(size: int, native: int, ratio: torch.Tensor) -> torch.Tensor:
    """``[size, native]``: row i holds torch's bicubic weights (A = -0.75, edge taps clamped) on the
    source pixels of output pixel i, whose source coordinate is ``(i + 0.5) * ratio - 0.5``; so
    ``W_h @ x @ W_w^T`` is ``F.interpolate(x, mode="bicubic")`` with input/output ratio ``ratio``."""
    a = -0.75

    def near(t: torch.Tensor) -> torch.Tensor:  # weight at distance |t| <= 1
        return ((a + 2) * t - (a + 3)) * t * t + 1

    def far(t: torch.Tensor) -> torch.Tensor:  # weight at distance 1 < |t| < 2
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

    # ratio rounded to float32, the source coordinate rounded once (a fused multiply-add): as torch's kernel
    i = torch.arange(size, device=ratio.device, dtype=torch.float64)
    src = ((i + 0.5) * ratio.float().double() - 0.5).float()
    first = src.floor()
    t = src - first
    weights = torch.stack([far(t + 1), near(t), near(1 - t), far((1 - t) + 1)], dim=1)  # taps first-1 .. first+2
    taps = (first.long().unsqueeze(1) + torch.arange(-1, 3, device=ratio.device)).clamp(0, native - 1)
    return (weights.unsqueeze(-1) * (taps.unsqueeze(-1) == torch.arange(native, device=ratio.device))).sum(1)


def _dino_resample_any_size(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The ``"dino"`` resampling of ``x [1, D, M, M]`` to ``[1, D, h, w]`` with h, w known only at run time
    (export), equal to the eager path up to float rounding. (``F.interpolate`` takes the scale factor
    ``(h + 0.1) / M`` as a constant, so an exported graph would resample every grid as the example's.)"""
    native = x.shape[-1]
    one = torch.ones((), device=x.device, dtype=torch.float64)  # torch divides in float64 too
    h_t, w_t = one * h, one * w
    at_native = (h_t == native) & (w_t == native)  # eager skips the resampling there; ratio 1 is the identity
    ratio_h = torch.where(at_native, 1.0, native / (h_t + 0.1))
    ratio_w = torch.where(at_native, 1.0, native / (w_t + 0.1))
    return _bicubic_matrix(h, native, ratio_h) @ (x @ _bicubic_matrix(w, native, ratio_w).transpose(0, 1))


def resample_patch_pos_embed(patch_pos: torch.Tensor, grid: Sequence[int], mode: str) -> torch.Tensor:
    """``[1, M*M, D]`` (native M x M grid) -> ``[1, h*w, D]`` for ``grid = (h, w)``."""
    n, dim = patch_pos.shape[1], patch_pos.shape[2]
    native = int(math.isqrt(n))
    if native * native != n:
        raise ValueError(f"pos_embed has {n} patch positions, not a square grid")
    exporting = is_exporting()  # then the grid is symbolic: int() or a branch on it would fix the example's
    h, w = (grid[0], grid[1]) if exporting else (int(grid[0]), int(grid[1]))
    if not exporting and (h, w) == (native, native):
        return patch_pos
    orig_dtype = patch_pos.dtype
    x = patch_pos.float().reshape(1, native, native, dim).permute(0, 3, 1, 2)
    if mode == "dino" and exporting:
        x = _dino_resample_any_size(x, h, w)
    elif mode == "dino":
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
            x = x + resample_patch_pos_embed(self.pos_embed, (h, w), self.pos_embed_interpolation)
            return self.pos_drop(torch.cat(prefix + [x], dim=1))
        # pos_embed = [cls position, patch positions]; registers (if any) get none
        n_pos_prefix = self.pos_embed.shape[1] - self.patch_embed.num_patches
        patch_pos = resample_patch_pos_embed(self.pos_embed[:, n_pos_prefix:], (h, w), self.pos_embed_interpolation)
        pos = torch.cat([self.pos_embed[:, :n_pos_prefix], patch_pos], dim=1)
        return self.pos_drop(torch.cat(prefix + [x], dim=1) + pos)


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
