"""Foundation-model backbone presets: family + size -> timm architecture, official-file format,
position-embedding rule and input normalization."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)

# name -> (mean, std), images scaled to [0, 1]
NORM_STATS: Dict[str, Tuple[Tuple[float, ...], Tuple[float, ...]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    # DINOv3 satellite models (SAT-493M), from the DINOv3 README
    "dinov3_sat493m": ((0.430, 0.411, 0.296), (0.213, 0.156, 0.143)),
    # VisionFM utils.get_stats(modality): the stats its pretraining used per imaging modality
    "visionfm_fundus": ((0.423737496137619, 0.2609460651874542, 0.128403902053833),
                        (0.29482534527778625, 0.20167365670204163, 0.13668020069599152)),
    "visionfm_oct": ((0.21091926, 0.21091926, 0.21091919), (0.17598894, 0.17598891, 0.17598893)),
    "visionfm_ffa": ((0.2020487, 0.20205145, 0.20201068), (0.17406046, 0.17404206, 0.17401208)),
    "visionfm_external": ((0.4936253, 0.36324808, 0.25956994), (0.32001, 0.27109432, 0.21991591)),
    "visionfm_slitlamp": ((0.5556667, 0.40288574, 0.38857886), (0.26516676, 0.23311588, 0.23903583)),
    "visionfm_ultrasound": ((0.05989236, 0.05978666, 0.056694973), (0.154277, 0.15504874, 0.14464583)),
    "visionfm_mri": ((0.17368862,) * 3, (0.16198656,) * 3),
    "visionfm_ubm": ((0.096110865,) * 3, (0.20977867,) * 3),
}


@dataclass(frozen=True)
class BackbonePreset:
    """A family of official checkpoints and the timm architecture each size maps to."""

    family: str
    sizes: Dict[str, str]  # size -> timm model name
    checkpoint_format: str  # the official file layout (see backbones/official.py)
    pos_embed_interpolation: str = "timm"  # see backbones/pos_embed.py; unused for RoPE models
    norm_stats: str = "imagenet"
    timm_kwargs: Dict[str, object] = field(default_factory=dict)
    note: str = ""
    pretrained_tag: Optional[str] = None  # timm's pretrained tag of these weights (``pretrained=True``); None: none


_DINOV3_SIZES = ("small", "small_plus", "base", "large", "huge_plus", "7b")

PRESETS: Dict[str, BackbonePreset] = {
    p.family: p
    for p in (
        BackbonePreset(
            "dinov2",
            {s: f"vit_{s}_patch14_dinov2" for s in ("small", "base", "large", "giant")},
            "dinov2",
            pos_embed_interpolation="dino",
            note="Meta DINOv2 (LVD-142M), patch 14, native 518 px; dinov2_vit{s,b,l,g}14_pretrain.pth",
            pretrained_tag="lvd142m",
        ),
        BackbonePreset(
            "dinov2_reg4",
            {s: f"vit_{s}_patch14_reg4_dinov2" for s in ("small", "base", "large", "giant")},
            "dinov2",
            pos_embed_interpolation="timm",  # official reg4 models resample by size with antialias
            note="DINOv2 with 4 registers, patch 14, native 518 px; dinov2_vit{s,b,l,g}14_reg4_pretrain.pth",
            pretrained_tag="lvd142m",
        ),
        BackbonePreset(
            "dinov3",
            {s: f"vit_{s}_patch16_dinov3" for s in _DINOV3_SIZES},
            "dinov3",
            note="Meta DINOv3 (LVD-1689M), patch 16, RoPE, 4 storage tokens, no qkv bias",
            pretrained_tag="lvd1689m",
        ),
        BackbonePreset(
            "dinov3_qkvb",
            {s: f"vit_{s}_patch16_dinov3_qkvb" for s in _DINOV3_SIZES if s != "7b"},
            "dinov3",
            note="DINOv3 with q/v biases, for files whose qkv.bias * bias_mask is not zero",
            pretrained_tag="lvd1689m",
        ),
        BackbonePreset(
            "dinov3_sat",
            {"large": "vit_large_patch16_dinov3", "7b": "vit_7b_patch16_dinov3"},
            "dinov3",
            norm_stats="dinov3_sat493m",
            note="DINOv3 satellite models (SAT-493M stats)",
            pretrained_tag="sat493m",
        ),
        BackbonePreset(
            "retfound",
            {"large": "vit_large_patch16_224"},
            "retfound_mae",
            pos_embed_interpolation="mae",
            note="RETFound MAE (retinal CFP/OCT), ViT-L/16, 224 px; RETFound_cfp_weights.pth, RETFound_mae_*.pth",
        ),
        BackbonePreset(
            "retfound_dinov2",
            {"large": "vit_large_patch14_dinov2"},
            "dinov2",
            pos_embed_interpolation="mae",
            timm_kwargs={"img_size": 224},
            note="RETFound DINOv2 (ViT-L/14, 224 px); RETFound_dinov2_*.pth",
        ),
        BackbonePreset(
            "visionfm",
            {"base": "vit_base_patch16_224"},
            "visionfm",
            pos_embed_interpolation="dino",
            note="VisionFM (ophthalmic, iBOT), ViT-B/16, 224 px; VFM_*_weights.pth; stats per modality",
        ),
    )
}


def _closest(word: str, options) -> str:
    match = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def resolve_backbone_size(backbone: str, backbone_size: Optional[str]) -> Optional[str]:
    """The size to build: ``None`` for a timm name; for a preset the given size, or its only size when
    it has one (retfound, visionfm). A multi-size preset without a size is a ValueError listing them."""
    preset = PRESETS.get(backbone)
    if preset is None:
        if backbone_size is not None:
            raise ValueError(
                f"backbone_size={backbone_size!r} only applies to the presets "
                f"({', '.join(PRESETS)}); {backbone!r} is taken as a timm model name, so set "
                f"backbone_size to null/None{_closest(backbone, PRESETS)}"
            )
        return None
    if backbone_size is None and len(preset.sizes) == 1:
        return next(iter(preset.sizes))
    if backbone_size not in preset.sizes:
        given = "no backbone_size" if backbone_size is None else f"backbone_size={backbone_size!r}"
        raise ValueError(
            f"backbone {backbone!r} has sizes {', '.join(preset.sizes)}; got {given}"
            f"{_closest(str(backbone_size), preset.sizes) if backbone_size is not None else ''}"
        )
    return backbone_size


def resolve_preset(backbone: str, backbone_size: Optional[str]) -> Tuple[str, Optional[BackbonePreset]]:
    """``(timm model name, preset or None)``; a name that is not a preset is taken as a timm model name."""
    size = resolve_backbone_size(backbone, backbone_size)
    preset = PRESETS.get(backbone)
    if preset is None:
        return backbone, None
    return preset.sizes[size], preset  # type: ignore[index]


def resolve_norm_stats(name: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    if name not in NORM_STATS:
        raise ValueError(f"unknown norm_stats {name!r}; choose one of {', '.join(NORM_STATS)}{_closest(name, NORM_STATS)}")
    return NORM_STATS[name]
