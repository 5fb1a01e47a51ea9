"""ViT backbones: presets for foundation models, any timm ViT, local checkpoints."""
from .checkpoint import adapt_patch_embed, load_timm_checkpoint, read_state_dict
from .factory import ViTBackbone, channel_stats, create_backbone
from .presets import IMAGENET_MEAN, IMAGENET_STD, PRESETS, BackbonePreset, resolve_preset

__all__ = [
    "BackbonePreset",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "ViTBackbone",
    "adapt_patch_embed",
    "channel_stats",
    "create_backbone",
    "load_timm_checkpoint",
    "read_state_dict",
    "resolve_preset",
]
