"""Foundation-model backbone presets: family + size -> timm architecture and input normalization."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackbonePreset:
    """A family of official checkpoints and the timm architecture each size maps to."""

    family: str
    sizes: Dict[str, str]  # size -> timm model name
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    timm_kwargs: Dict[str, object] = field(default_factory=dict)
    note: str = ""


PRESETS: Dict[str, BackbonePreset] = {
    p.family: p
    for p in (
        BackbonePreset(
            "dinov2",
            {s: f"vit_{s}_patch14_dinov2" for s in ("small", "base", "large", "giant")},
            note="Meta DINOv2 (LVD-142M), patch 14, native 518 px",
        ),
        BackbonePreset(
            "dinov2_reg4",
            {s: f"vit_{s}_patch14_reg4_dinov2" for s in ("small", "base", "large", "giant")},
            note="DINOv2 with 4 register tokens, patch 14, native 518 px",
        ),
        BackbonePreset(
            "dinov3",
            {
                s: f"vit_{s}_patch16_dinov3"
                for s in ("small", "small_plus", "base", "large", "huge_plus", "7b")
            },
            note="Meta DINOv3 (LVD-1689M), patch 16, RoPE, 4 storage tokens",
        ),
        BackbonePreset(
            "retfound",
            {"large": "vit_large_patch16_224"},
            note="RETFound (MAE on retinal images), ViT-L/16, 224 px, ImageNet mean/std",
        ),
        BackbonePreset(
            "visionfm",
            {"base": "vit_base_patch16_224"},
            note="VisionFM (ophthalmic, DINO/iBOT), ViT-B/16, 224 px",
        ),
    )
}


def _closest(word: str, options) -> str:
    match = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def resolve_preset(backbone: str, backbone_size: Optional[str]) -> Tuple[str, Optional[BackbonePreset]]:
    """``(timm model name, preset or None)``; a name that is not a preset is taken as a timm model name."""
    preset = PRESETS.get(backbone)
    if preset is None:
        if backbone_size is not None:
            raise ValueError(
                f"backbone_size={backbone_size!r} only applies to the presets "
                f"({', '.join(PRESETS)}); {backbone!r} is taken as a timm model name, so set "
                f"backbone_size to null/None{_closest(backbone, PRESETS)}"
            )
        return backbone, None
    if backbone_size not in preset.sizes:
        raise ValueError(
            f"backbone {backbone!r} has sizes {', '.join(preset.sizes)}, got backbone_size="
            f"{backbone_size!r}{_closest(str(backbone_size), preset.sizes)}"
        )
    return preset.sizes[backbone_size], preset
