"""``create_segmentation_model``: the nnU-Net ViT plan's keyword names for building an UperNetViT."""
from __future__ import annotations

import inspect
from typing import Any, Dict, Optional, Sequence

from .model import UperNetViT


def create_segmentation_model(
    backbone_name: str = "dinov2",
    backbone_size: Optional[str] = "base",
    num_classes: int = 2,
    checkpoint_path: Optional[str] = None,
    freeze_backbone: bool = False,
    use_lora: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.05,
    lora_target_modules: Sequence[str] = ("qkv",),
    hidden_size: int = 512,
    pool_scales: Sequence[int] = (1, 2, 3, 6),
    in_chans: int = 3,
    feature_indices: Optional[Sequence[int]] = None,
    upsampler: str = "bilinear",
    norm: str = "layernorm",
    dropout: float = 0.1,
    aux_head: bool = False,
    aux_channels: int = 256,
    gradient_checkpointing: bool = False,
    winograd: bool = True,
    backbone_kwargs: Optional[Dict[str, Any]] = None,
    **unknown: Any,
) -> UperNetViT:
    """Build an :class:`UperNetViT`, optionally with LoRA; an unknown keyword is a ``TypeError``."""
    if unknown:
        accepted = [p for p in inspect.signature(create_segmentation_model).parameters if p != "unknown"]
        raise TypeError(
            f"create_segmentation_model() got unknown keyword(s) {sorted(unknown)}; accepted: {', '.join(accepted)}"
        )
    model = UperNetViT(
        backbone=backbone_name,
        backbone_size=backbone_size,
        num_classes=num_classes,
        in_chans=in_chans,
        checkpoint_path=checkpoint_path,
        decoder_channels=hidden_size,
        pool_scales=pool_scales,
        feature_indices=feature_indices,
        upsampler=upsampler,
        freeze_backbone=freeze_backbone,
        backbone_kwargs=backbone_kwargs,
        norm=norm,
        dropout=dropout,
        aux_head=aux_head,
        aux_channels=aux_channels,
        gradient_checkpointing=gradient_checkpointing,
        winograd=winograd,
    )
    if use_lora:
        model.enable_lora(lora_rank, lora_alpha, lora_dropout, lora_target_modules)
    return model
