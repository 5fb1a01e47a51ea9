"""Optimizer parameter groups (layer-wise LR decay, no decay on norms/biases/tokens) and the LR schedule."""
from __future__ import annotations

import re
from typing import Dict, List

import torch
from torch import nn

from ..config import TrainConfig

_NO_DECAY_NAMES = ("cls_token", "reg_token", "pos_embed", "register_tokens", "storage_tokens", "mask_token")


def backbone_layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for block i, depth + 1 for the final norm (names inside ``backbone.``)."""
    match = re.search(r"\bblocks\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    if re.search(r"\b(patch_embed|cls_token|reg_token|pos_embed|rope)\b", name):
        return 0
    return depth + 1


def param_groups(model: nn.Module, cfg: TrainConfig, depth: int) -> List[Dict]:
    """Groups with ``lr_scale`` (layer decay for backbone params) and weight decay 0 for 1-D params
    (norms, biases) and tokens. The scheduler multiplies ``initial_lr * lr_scale``."""
    groups: Dict[tuple, Dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or any(token in name for token in _NO_DECAY_NAMES)
        scale = 1.0
        if cfg.layer_decay is not None and name.startswith("backbone."):
            scale = cfg.layer_decay ** (depth + 1 - backbone_layer_id(name, depth))
        key = (no_decay, scale)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else cfg.weight_decay, "lr_scale": scale}
        groups[key]["params"].append(param)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: TrainConfig, depth: int) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters (layer-wise LR decay groups). A trainable parameter stored
    below float32 is a ValueError: its updates would be rounded away (bfloat16 keeps 8 bits of mantissa)."""
    low = [(n, p.dtype) for n, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float32]
    if low:
        raise ValueError(
            f"{len(low)} trainable parameter(s) are stored in {str(low[0][1]).replace('torch.', '')} (e.g. {low[0][0]}): "
            f"the optimizer would round most updates away. A backbone stored below float32 (backbone_dtype) "
            f"trains through LoRA only: keep its weights frozen (requires_grad False), or build it in float32"
        )
    groups = param_groups(model, cfg, depth)
    for g in groups:
        g["lr"] = cfg.initial_lr * g["lr_scale"]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.initial_lr)
    return torch.optim.SGD(groups, lr=cfg.initial_lr, momentum=cfg.momentum, nesterov=True)


def warmup_poly(total_steps: int, warmup_steps: int, exponent: float = 0.9):
    """LR factor per step: linear from 1/warmup to 1 over ``warmup_steps``, then ``(1 - t)^exponent``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        return max(0.0, 1 - (step - warmup_steps) / span) ** exponent

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    total = cfg.num_epochs * cfg.num_iterations_per_epoch
    warmup = int(round(cfg.warmup_epochs * cfg.num_iterations_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_poly(total, min(warmup, total), cfg.poly_exponent))
