"""Export-only formulations: the eager model's math, written so that one traced graph (``torch.export``
with dynamic batch, H and W; the ONNX exporter) computes every input size correctly.

Eager code may branch on a size or take a size-dependent constant, which a trace fixes to the example's:
``F.adaptive_avg_pool2d`` is decomposed with the example's bins, the DINO pos-embed rule interpolates
by a scale factor ``(h + 0.1) / M`` that becomes a constant, the padding branches on ``pad > 0``, and
the crop's view adds a contiguity guard.
Each has a size-generic twin here, equal up to float rounding (tests/export/test_export_onnx.py). The
core modules keep one overridable method per such step (``PyramidPoolingModule.pool``,
``OfficialPosEmbedViT.resample_pos_embed``, ``UperNetViT.pad`` and ``.crop``); :func:`export_formulations`
swaps in the twins for the duration of an export and restores the model afterwards.
"""
from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from typing import Iterator, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..backbones.pos_embed import OfficialPosEmbedViT
from ..model import UperNetViT
from ..ppm import PyramidPoolingModule


def adaptive_avg_pool2d_any_size(x: torch.Tensor, size: int) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, size)`` for ``x [B, C, h, w]`` as ``A_h @ x @ A_w^T``, with averaging
    matrices ``A_n [size, n]`` built from the run-time n. Bin i holds torch's rows
    ``floor(i*n/size) <= j < ceil((i+1)*n/size)``, i.e. ``i*n < (j+1)*size`` and ``j*size < (i+1)*n``.
    """
    if size == 1:
        return x.mean((-2, -1), keepdim=True)

    def averaging_matrix(n: int) -> torch.Tensor:
        i = torch.arange(size, device=x.device).unsqueeze(1)
        j = torch.arange(n, device=x.device)
        inside = ((i * n < (j + 1) * size) & (j * size < (i + 1) * n)).to(x.dtype)
        return inside / inside.sum(1, keepdim=True)

    return averaging_matrix(x.shape[-2]) @ x @ averaging_matrix(x.shape[-1]).transpose(0, 1)


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


def resample_pos_embed_any_size(patch_pos: torch.Tensor, grid: Sequence[int], mode: str) -> torch.Tensor:
    """:func:`~upernet_vit.backbones.pos_embed.resample_patch_pos_embed` for a symbolic grid ``(h, w)``:
    no ``int()`` and no branch on it. At the native grid the eager code skips the resampling; here
    ``"dino"`` uses ratio 1 there and ``"mae"`` interpolates, both exact identities."""
    n, dim = patch_pos.shape[1], patch_pos.shape[2]
    native = math.isqrt(n)
    h, w = grid[0], grid[1]
    x = patch_pos.float().reshape(1, native, native, dim).permute(0, 3, 1, 2)
    if mode == "dino":
        x = _dino_resample_any_size(x, h, w)
    else:  # "mae" ("timm" is timm's own code, not OfficialPosEmbedViT)
        x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=False)
    return x.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(patch_pos.dtype)


def pad_to_multiple_any_size(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """:func:`~upernet_vit.model.pad_to_multiple` with the pad always in the graph (possibly 0 px) unless
    it is provably 0, so the graph serves every size."""
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if not statically_known_true(pad_w == 0):
        x = F.pad(x, (0, pad_w, 0, 0), mode="reflect" if pad_w < w else "replicate")
    if not statically_known_true(pad_h == 0):
        x = F.pad(x, (0, 0, 0, pad_h), mode="reflect" if pad_h < h else "replicate")
    return x


class _ExportablePool:
    def pool(self, x: torch.Tensor, scale: int) -> torch.Tensor:
        return adaptive_avg_pool2d_any_size(x, scale)


class _ExportablePosEmbed:
    def resample_pos_embed(self, patch_pos: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        return resample_pos_embed_any_size(patch_pos, grid, self.pos_embed_interpolation)  # type: ignore[attr-defined]


def crop_any_size(logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``logits[..., :height, :width]`` as a gather, not a view: the view's contiguity test would add a
    guard that holds only for sizes that are (or only for those that are not) multiples of the patch."""
    rows = torch.arange(height, device=logits.device)
    cols = torch.arange(width, device=logits.device)
    return logits.index_select(-2, rows).index_select(-1, cols)


class _ExportablePadCrop:
    def pad(self, x: torch.Tensor) -> torch.Tensor:
        return pad_to_multiple_any_size(x, self.patch_size)  # type: ignore[attr-defined]

    def crop(self, logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return crop_any_size(logits, height, width)


_TWINS: List[Tuple[type, type]] = [
    (UperNetViT, _ExportablePadCrop),
    (PyramidPoolingModule, _ExportablePool),
    (OfficialPosEmbedViT, _ExportablePosEmbed),
]


@functools.lru_cache(maxsize=None)
def _exportable(cls: type, twin: type) -> type:
    """A subclass of ``cls`` with the twin's method first (so the module stays an instance of ``cls``)."""
    return type(f"Exportable{cls.__name__}", (twin, cls), {})


@contextmanager
def export_formulations(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model``'s size-dependent steps use their export twins (same parameters and
    buffers); on exit every module gets its own class back."""
    swapped: List[Tuple[nn.Module, type]] = []
    try:
        for module in model.modules():
            for base, twin in _TWINS:
                if isinstance(module, base) and not isinstance(module, twin):
                    swapped.append((module, type(module)))
                    module.__class__ = _exportable(type(module), twin)
        yield model
    finally:
        for module, cls in swapped:
            module.__class__ = cls
