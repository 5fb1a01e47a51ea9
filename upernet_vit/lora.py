"""What trains in the backbone: everything (full fine-tuning), nothing (frozen), or peft LoRA adapters.

The decoder (pyramid, head, upsampler) always trains. These functions are also ``UperNetViT`` methods
(``model.enable_lora(...)``); the LoRA settings live in ``model.lora_config`` so ``save_pretrained``
records them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from .config import ConfigError, LoraConfig, check_backbone_storage

if TYPE_CHECKING:
    from .model import UperNetViT


def set_backbone_trainable(model: "UperNetViT", trainable: bool) -> None:
    """Full fine-tuning (True) or a frozen backbone (False). With LoRA on, True trains the LoRA weights only.
    A backbone stored below float32 (``backbone_dtype``) trains only through LoRA: True without LoRA is a
    :class:`~upernet_vit.config.ConfigError` (the rule ``Config`` holds YAML files to, precision.py)."""
    lora_on = model.lora_config is not None
    if trainable:
        stored = _half_storage(model)
        if stored:
            check_backbone_storage(stored, frozen=False, lora=lora_on, how="api")
    for name, p in model.backbone.named_parameters():
        p.requires_grad = trainable and ("lora_" in name or not lora_on)


def _half_storage(model: "UperNetViT") -> str:
    """``"bfloat16"`` or ``"float16"`` when the backbone's own weights (LoRA adapters aside) are stored so,
    else ``""``: the storage that cannot train itself (precision.py)."""
    dtypes = {p.dtype for n, p in model.backbone.named_parameters() if "lora_" not in n}
    return next((str(d).replace("torch.", "") for d in (torch.bfloat16, torch.float16) if d in dtypes), "")


_DEFAULT = LoraConfig()  # the defaults, declared once in config.LoraConfig


def enable_lora(
    model: "UperNetViT",
    rank: int = _DEFAULT.r,
    alpha: float = _DEFAULT.lora_alpha,
    dropout: float = _DEFAULT.lora_dropout,
    target_modules: Sequence[str] = tuple(_DEFAULT.target_modules),
) -> None:
    """Wrap the backbone's ``target_modules`` linears with peft LoRA adapters.

    Afterwards exactly the LoRA weights and the decoder (adapter, head, upsampler) are trainable.
    """
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft.tuners.lora import LoraModel
    except ImportError as err:
        raise ModuleNotFoundError(
            f"LoRA (lora.enabled / enable_lora) needs the peft package, which cannot be imported ({err}); install "
            f"it with: pip install 'peft>=0.11' (a dependency of upernet-vit: pip install -e . brings it back)",
            name="peft",
        ) from None

    if model.lora_config is not None:
        raise RuntimeError("LoRA is already enabled on this model; call merge_lora() first to add another")
    try:  # LoraConfig's range checks: rank >= 1, dropout in [0, 1), at least one target
        settings = LoraConfig(
            enabled=True, r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout),
            target_modules=[target_modules] if isinstance(target_modules, str) else list(target_modules),
        )
    except ConfigError as err:
        raise ConfigError(f"LoRA {err}") from None
    names = [n for n, m in model.backbone.vit.named_modules() if isinstance(m, nn.Linear)]
    targets = settings.target_modules
    if not any(n == t or n.endswith("." + t) for n in names for t in targets):
        linears = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(
            f"LoRA target_modules {targets} match no linear layer of backbone {model.backbone.name!r}; "
            f"its linear layers are named: {', '.join(linears)}"
        )
    peft_config = PeftLoraConfig(r=settings.r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                                 target_modules=targets)
    model.backbone.vit = LoraModel(model.backbone.vit, peft_config, "default")
    for name, p in model.backbone.vit.named_parameters():
        if "lora_" in name:  # float32 master weights beside a bfloat16/float16 backbone, as the decoder's
            p.data = p.data.float()
    model.lora_config = settings
    set_backbone_trainable(model, True)


def merge_lora(model: "UperNetViT") -> None:
    """Fold the LoRA deltas into the backbone weights and drop the adapters (same outputs, plain model).
    A backbone stored below float32 is frozen afterwards, and its config says so (``freeze_backbone``)."""
    if model.lora_config is None:
        raise RuntimeError("merge_lora() needs LoRA enabled; call enable_lora() first")
    frozen = model.config.freeze_backbone or bool(_half_storage(model))  # decided before anything changes
    model.backbone.vit = model.backbone.vit.merge_and_unload()
    model.lora_config = None
    model.config.freeze_backbone = frozen
    set_backbone_trainable(model, not frozen)
