"""From plain-ViT tokens to a true feature pyramid (strides 4, 8, 16, 32 for a patch-16 ViT).

A plain ViT keeps one resolution (stride = patch size) in every block. UperNet wants a pyramid, so
we tap four blocks and give each tap its own resampling op (ViTDet's "simple feature pyramid", in the
BEiT/MAE per-tap form): 4x, 2x, 1x and 0.5x.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .layers import ConvNormAct, build_norm2d

if TYPE_CHECKING:
    from .backbones.factory import ViTBackbone


def default_feature_indices(depth: int) -> Tuple[int, int, int, int]:
    """Blocks tapped for a ViT of ``depth`` blocks: ``[d/4-1, d/2-1, 3d/4-1, d-1]``.

    12 -> (2, 5, 8, 11), 24 -> (5, 11, 17, 23), 40 -> (9, 19, 29, 39).
    """
    if depth < 4 or depth % 4:
        suggestion = [max(0, round(depth * f) - 1) for f in (0.25, 0.5, 0.75, 1.0)]
        raise ValueError(
            f"the default taps [d/4-1, d/2-1, 3d/4-1, d-1] need a depth that is a multiple of 4, "
            f"and this backbone has depth {depth}; pass feature_indices explicitly "
            f"(4 block indices in 0..{depth - 1}, e.g. {suggestion})"
        )
    q = depth // 4
    return (q - 1, 2 * q - 1, 3 * q - 1, depth - 1)


def resolve_feature_indices(depth: int, feature_indices: Optional[Sequence[int]]) -> Tuple[int, ...]:
    """Validate explicit taps (negative counts from the end, repeats allowed) or apply the default rule."""
    if feature_indices is None:
        return default_feature_indices(depth)
    indices = tuple(int(i) for i in feature_indices)
    if len(indices) != 4:
        raise ValueError(f"feature_indices must name 4 blocks (one per pyramid level), got {list(indices)}")
    bad = [i for i in indices if not -depth <= i < depth]
    if bad:
        raise ValueError(
            f"feature_indices {list(indices)} has {bad} outside the backbone's {depth} blocks "
            f"(valid: 0..{depth - 1}, or -{depth}..-1 from the end)"
        )
    return tuple(i % depth for i in indices)


def prepare_vit_for_taps(backbone: "ViTBackbone", indices: Sequence[int]) -> None:
    """Make ``backbone.vit`` serve only the taps: drop blocks after the last one (they would cost compute
    and get no gradient; ``backbone.depth`` becomes the blocks kept) and the classifier. ViTs that keep
    their final norm as ``fc_norm`` (global-average pooling variants such as EVA-02) get it moved to
    ``norm``, so the taps are normalized for them too."""
    vit = backbone.vit
    fc_norm = getattr(vit, "fc_norm", None)
    if isinstance(getattr(vit, "norm", None), nn.Identity) and fc_norm is not None and not isinstance(fc_norm, nn.Identity):
        vit.norm, vit.fc_norm = fc_norm, nn.Identity()
    vit.prune_intermediate_layers(sorted(set(indices)), prune_norm=False, prune_head=True)
    backbone.depth = len(vit.blocks)


def extract_feature_maps(vit: nn.Module, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
    """Token maps of the tapped blocks, via timm's ``forward_intermediates``.

    ``x [B, C, H, W]`` with H, W multiples of the patch size -> one ``[B, D, H/p, W/p]`` per index,
    final norm applied (as DINOv2's ``get_intermediate_layers(norm=True)``), prefix tokens (cls,
    registers) dropped. Repeated indices are computed once.
    """
    unique = sorted(set(indices))
    maps = vit.forward_intermediates(
        x, indices=unique, norm=True, output_fmt="NCHW", intermediates_only=True
    )
    by_index = dict(zip(unique, maps))
    return [by_index[i] for i in indices]


class SimpleFeaturePyramid(nn.Module):
    """Four same-stride ViT maps -> four maps at 4x, 2x, 1x and 0.5x their resolution.

    ``maps[i] [B, D, h, w]`` (stride p = patch size); level i gets op i:

    - 0: deconv 2x2 s2 -> norm -> GELU -> deconv 2x2 s2 -> ``[B, D, 4h, 4w]``  (stride p/4)
    - 1: deconv 2x2 s2                                    -> ``[B, D, 2h, 2w]``  (stride p/2)
    - 2: identity                                         -> ``[B, D, h, w]``    (stride p)
    - 3: max-pool 2x2 s2, ceil mode                       -> ``[B, D, ceil(h/2), ceil(w/2)]`` (2p)

    Ceil mode keeps the last row/column of an odd grid (37x37 from a 518 px DINOv2 input -> 19x19)
    and lets a 1x1 grid through; on even grids it equals the usual floor-mode pool.
    """

    def __init__(self, embed_dim: int, norm: str = "layernorm") -> None:
        super().__init__()
        d = embed_dim
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(d, d, kernel_size=2, stride=2),
            build_norm2d(norm, d),
            nn.GELU(),
            nn.ConvTranspose2d(d, d, kernel_size=2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(d, d, kernel_size=2, stride=2)
        self.identity = nn.Identity()
        self.down2 = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
        self.out_channels: Tuple[int, int, int, int] = (d, d, d, d)

    def forward(self, maps: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if len(maps) != 4:
            raise ValueError(f"SimpleFeaturePyramid takes 4 maps, got {len(maps)}")
        ops = (self.up4, self.up2, self.identity, self.down2)
        return [op(m) for op, m in zip(ops, maps)]


class ViTDetFeaturePyramid(nn.Module):
    """ViTDet's form of the simple feature pyramid (Li et al., 2022; detectron2): narrower upsampling
    stages, then a projection of every level to ``out_channels`` C, so that a wide ViT (D = 4096 for
    DINOv3-7B) does not carry D channels at strides p/4 and p/2.

    ``maps[i] [B, D, h, w]``; level i gets op i, then its own 1x1 conv -> norm -> 3x3 conv -> norm:

    - 0: deconv D -> D/2 -> norm -> GELU -> deconv D/2 -> D/4  -> ``[B, C, 4h, 4w]``
    - 1: deconv D -> D/2                                      -> ``[B, C, 2h, 2w]``
    - 2: identity                                             -> ``[B, C, h, w]``
    - 3: max-pool 2x2 s2, ceil mode                           -> ``[B, C, ceil(h/2), ceil(w/2)]``

    About 4.5 D^2 + 2.75 D C + 36 C^2 parameters against :class:`SimpleFeaturePyramid`'s 12 D^2 (for
    DINOv3-7B with C = 512: 0.09B against 0.20B). Its weights are its own: mmsegmentation's BEiT/MAE
    necks load into :class:`SimpleFeaturePyramid`, the default (:func:`upernet_vit.convert.from_mmseg_neck`).
    """

    def __init__(self, embed_dim: int, out_channels: int, norm: str = "layernorm") -> None:
        super().__init__()
        d, c = embed_dim, out_channels
        if d % 4:
            raise ValueError(f"the ViTDet pyramid halves the width twice: embed_dim {d} must be a multiple of 4")
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(d, d // 2, kernel_size=2, stride=2),
            build_norm2d(norm, d // 2),
            nn.GELU(),
            nn.ConvTranspose2d(d // 2, d // 4, kernel_size=2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(d, d // 2, kernel_size=2, stride=2)
        self.identity = nn.Identity()
        self.down2 = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
        self.projections = nn.ModuleList(
            nn.Sequential(ConvNormAct(width, c, 1, norm, nn.Identity), ConvNormAct(c, c, 3, norm, nn.Identity))
            for width in (d // 4, d // 2, d, d)
        )
        self.out_channels: Tuple[int, int, int, int] = (c, c, c, c)

    def forward(self, maps: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if len(maps) != 4:
            raise ValueError(f"ViTDetFeaturePyramid takes 4 maps, got {len(maps)}")
        ops = (self.up4, self.up2, self.identity, self.down2)
        return [project(op(m)) for op, project, m in zip(ops, self.projections, maps)]


def build_feature_pyramid(name: str, embed_dim: int, out_channels: int, norm: str) -> nn.Module:
    """``"simple"`` (:class:`SimpleFeaturePyramid`, D channels at every level) or ``"vitdet"``
    (:class:`ViTDetFeaturePyramid`, ``out_channels`` at every level)."""
    if name == "simple":
        return SimpleFeaturePyramid(embed_dim, norm=norm)
    if name == "vitdet":
        return ViTDetFeaturePyramid(embed_dim, out_channels, norm=norm)
    raise ValueError(f"unknown feature pyramid {name!r}; choose 'simple' or 'vitdet'")
