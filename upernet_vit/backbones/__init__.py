"""ViT backbones: presets for foundation models, any timm ViT, local checkpoints."""
from .checkpoint import adapt_patch_embed, load_backbone_checkpoint, read_checkpoint
from .factory import ViTBackbone, channel_stats, create_backbone
from .official import CHECKPOINT_FORMATS, to_timm
from .pos_embed import POS_EMBED_MODES, resample_patch_pos_embed, use_pos_embed_interpolation
from .presets import IMAGENET_MEAN, IMAGENET_STD, NORM_STATS, PRESETS, BackbonePreset, resolve_backbone_size, resolve_norm_stats, resolve_preset

__all__ = [
    "BackbonePreset",
    "CHECKPOINT_FORMATS",
    "NORM_STATS",
    "POS_EMBED_MODES",
    "load_backbone_checkpoint",
    "read_checkpoint",
    "resample_patch_pos_embed",
    "resolve_norm_stats",
    "to_timm",
    "use_pos_embed_interpolation",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "ViTBackbone",
    "adapt_patch_embed",
    "channel_stats",
    "create_backbone",
    "resolve_backbone_size",
    "resolve_preset",
]
