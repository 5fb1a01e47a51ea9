"""``create_segmentation_model``: the nnU-Net ViT plan's keyword names for building an UperNetViT.

The seed names map onto :class:`~upernet_vit.config.ModelConfig` and :class:`~upernet_vit.config.LoraConfig`;
every other model option (``in_chans``, ``norm``, ``upsampler``, ...) passes through by its own name.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from .config import LoraConfig, model_option_names
from .model import UperNetViT

_LORA = LoraConfig()  # the LoRA defaults, declared once in config.LoraConfig


def create_segmentation_model(
    backbone_name: str = "dinov2",
    backbone_size: Optional[str] = "base",
    num_classes: int = 2,
    use_lora: bool = False,
    lora_rank: int = _LORA.r,
    lora_alpha: float = _LORA.lora_alpha,
    lora_dropout: float = _LORA.lora_dropout,
    lora_target_modules: Sequence[str] = tuple(_LORA.target_modules),
    **model_options: Any,
) -> UperNetViT:
    """Build an :class:`UperNetViT`, optionally with LoRA.

    Seed keywords: ``backbone_name`` (-> ``backbone``), ``backbone_size``, ``num_classes``,
    ``checkpoint_path``, ``freeze_backbone``, ``hidden_size``, ``pool_scales``, ``use_lora`` and
    ``lora_rank``/``lora_alpha``/``lora_dropout``/``lora_target_modules``. An unknown keyword is a
    ``TypeError`` that names it.
    """
    unknown = sorted(set(model_options) - (set(model_option_names()) - {"backbone"}))  # backbone_name
    if unknown:
        seed = ["backbone_name", "backbone_size", "num_classes", "use_lora", "lora_rank", "lora_alpha",
                "lora_dropout", "lora_target_modules"]
        raise TypeError(
            f"create_segmentation_model() got unknown keyword(s) {unknown}; accepted: "
            f"{', '.join(seed + [n for n in model_option_names() if n not in seed and n != 'backbone'])}"
        )
    model = UperNetViT(backbone=backbone_name, backbone_size=backbone_size, num_classes=num_classes, **model_options)
    if use_lora:
        model.enable_lora(lora_rank, lora_alpha, lora_dropout, lora_target_modules)
    return model
