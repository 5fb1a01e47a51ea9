"""nnU-Net v2 trainers whose network is an UperNetViT.

nnU-Net keeps its planning, preprocessing, augmentation, loss, validation and inference; these
trainers change the network (rebuilt from the plans and the trainer class alone, which is what
``nnUNetv2_predict`` calls), turn deep supervision off, and use AdamW with linear warmup then poly
decay, as nnU-Net's own transformer (Primus) trainers do.

Where the model recipe comes from:

- ``nnUNetTrainerUperNetViT`` (generic): a YAML config (``upernet-vit nnunet-train ... --config C``, or
  the ``UPERNET_VIT_CONFIG`` variable) at training time. The resolved config is written into the
  plans of the run's output folder (``plans.json``), so ``nnUNetv2_predict`` needs no variable.
- One class per shipped recipe (``nnUNetTrainerUperNetViT_DINOv2_Base`` and others): the class names its
  file in ``upernet_vit/recipes/``, the one ``upernet-vit train NAME`` reads; ``UPERNET_VIT_CHECKPOINT``
  names the pretrained backbone file at training time.

The pretrained backbone file is read only when training starts; predictions load nnU-Net's checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
from functools import partial
from typing import Any, Dict, Optional

import torch
from torch import nn

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from ...config import Config, check_training_storage, load_config
from ...model import UperNetViT
from ...recipes import recipe_path
from ...training.optim import build_optimizer, warmup_poly
from . import CHECKPOINT_ENV, CONFIG_ENV

NETWORK_CLASS_NAME = "upernet_vit.UperNetViT"
PLANS_KEY = "upernet_vit"  # where the resolved config lives in the plans' arch_kwargs


class InputStandardization(nn.Module):
    """``(x - mean) / std`` per channel, for nnU-Net data scaled to [0, 1] (``rgb_to_0_1``), so a
    pretrained backbone sees the statistics it was trained with. Z-scored data passes unchanged."""

    def __init__(self, mean, std) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class NnUNetUperNetViT(nn.Module):
    """``[B, C, *patch] -> [B, K, *patch]``: optional input standardization, then the UperNetViT."""

    def __init__(self, model: UperNetViT, standardize: bool) -> None:
        super().__init__()
        self.standardize = InputStandardization(model.mean, model.std) if standardize else nn.Identity()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.standardize(x))


def build_network(
    config: Config, normalization_schemes, num_input_channels: int, num_output_channels: int, load_pretrained: bool
) -> NnUNetUperNetViT:
    """The nnU-Net network for ``config``; ``load_pretrained`` reads ``model.checkpoint_path`` (training only)."""
    overrides: Dict[str, Any] = dict(num_classes=num_output_channels, in_chans=num_input_channels)
    if load_pretrained:  # training: the same storage rules as upernet-vit train, before anything is built
        check_training_storage(config)
    else:
        overrides["checkpoint_path"] = None
        overrides["pretrained"] = False
    model = UperNetViT.from_config(config, **overrides)
    standardize = bool(normalization_schemes) and all("RGBTo01" in s for s in normalization_schemes)
    return NnUNetUperNetViT(model, standardize)


class EpochWarmupPolyLR(torch.optim.lr_scheduler.LRScheduler):
    """nnU-Net's scheduler interface (``step(epoch)``): linear warmup, then poly decay, per epoch.

    Each parameter group keeps its own base LR (layer-wise decay), scaled by the same factor."""

    def __init__(self, optimizer: torch.optim.Optimizer, num_epochs: int, warmup_epochs: int, exponent: float = 0.9) -> None:
        self.factor = warmup_poly(num_epochs, warmup_epochs, exponent)
        self.ctr = 0
        super().__init__(optimizer)

    def get_lr(self):
        return [g["initial_lr"] * self.factor(max(self.last_epoch, 0)) for g in self.optimizer.param_groups]

    def step(self, current_step: Optional[int] = None) -> None:  # type: ignore[override]
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        self.last_epoch = int(current_step)
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]


class nnUNetTrainerUperNetViT(nnUNetTrainer):
    """Generic UperNetViT trainer: the recipe is a YAML config (``UPERNET_VIT_CONFIG`` at training time)."""

    #: the shipped recipe (upernet_vit/recipes/NAME.yaml) that subclasses fix; None: the YAML the variable names
    recipe_name: Optional[str] = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if len(self.configuration_manager.patch_size) != 2:
            raise RuntimeError(
                f"UperNetViT is a 2D model; configuration {configuration!r} has patch size "
                f"{self.configuration_manager.patch_size}. Train the '2d' configuration."
            )
        config = self.recipe()
        self.config = config
        t = config.train
        self.initial_lr = t.initial_lr
        self.weight_decay = t.weight_decay
        self.num_epochs = t.num_epochs
        self.num_iterations_per_epoch = t.num_iterations_per_epoch
        self.num_val_iterations_per_epoch = t.num_val_iterations_per_epoch
        self.enable_deep_supervision = False
        # store the recipe in the plans: nnU-Net copies them into the output folder, nnUNetv2_predict reads them
        stored = config.to_dict()
        stored.pop("data", None)
        self.plans_manager.plans["configurations"][configuration]["architecture"] = {
            "network_class_name": NETWORK_CLASS_NAME,
            "arch_kwargs": {PLANS_KEY: stored},
            "_kw_requires_import": [],
        }
        self.configuration_manager = self.plans_manager.get_configuration(configuration)

    @classmethod
    def recipe(cls) -> Config:
        """The class's recipe, or the YAML named by ``UPERNET_VIT_CONFIG``."""
        if cls.recipe_name is not None:
            config = load_config(recipe_path(cls.recipe_name))  # its data section is nnU-Net's business
            if os.environ.get(CHECKPOINT_ENV):
                config.model.checkpoint_path = os.environ[CHECKPOINT_ENV]
            return config
        path = os.environ.get(CONFIG_ENV)
        if not path:
            raise RuntimeError(
                f"{cls.__name__} needs a YAML config: run `upernet-vit nnunet-train DATASET 2d FOLD --config C` "
                f"or export {CONFIG_ENV}=/path/to/config.yaml (predictions need neither: the config is in plans.json)"
            )
        config = load_config(path)
        if config.train.class_weights is not None:  # not silently dropped
            raise ValueError(
                f"{path}: train.class_weights applies to `upernet-vit train`; inside nnU-Net the loss is nnU-Net's "
                f"(subclass the trainer and set self.loss to weight it). Remove the key for nnunet-train"
            )
        return config

    @classmethod
    def build_network_architecture(
        cls,
        plans_manager: PlansManager,
        configuration_manager: ConfigurationManager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
        load_pretrained: bool = False,
    ) -> nn.Module:
        """What ``nnUNetv2_predict`` calls: the network from the config stored in the plans."""
        kwargs = configuration_manager.network_arch_init_kwargs or {}
        config = load_config(kwargs[PLANS_KEY]) if PLANS_KEY in kwargs else cls.recipe()
        return build_network(
            config, configuration_manager.normalization_schemes, num_input_channels, num_output_channels, load_pretrained
        )

    def initialize(self) -> None:
        # nnU-Net's initialize() builds the network through self.build_network_architecture; when
        # training, that build also reads the pretrained backbone file (prediction never does).
        self.build_network_architecture = partial(type(self).build_network_architecture, load_pretrained=True)  # type: ignore[method-assign]
        try:
            super().initialize()
        finally:
            del self.build_network_architecture

    def configure_optimizers(self):
        model = self.network.module if self.is_ddp else self.network
        inner = getattr(model, "_orig_mod", model).model  # the UperNetViT
        # nnU-Net users set initial_lr / weight_decay on the trainer; those win over the config
        t = dataclasses.replace(self.config.train, initial_lr=self.initial_lr, weight_decay=self.weight_decay)
        optimizer = build_optimizer(inner, t, inner.backbone.depth)
        warmup = int(round(t.warmup_epochs))
        return optimizer, EpochWarmupPolyLR(optimizer, self.num_epochs, min(warmup, self.num_epochs), t.poly_exponent)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """UperNetViT has one output; nothing to switch."""


class nnUNetTrainerUperNetViT_DINOv2_Base(nnUNetTrainerUperNetViT):
    """DINOv2 ViT-B/14, full fine-tuning (AdamW 1e-4, layer decay 0.9): recipe ``dinov2_base``."""

    recipe_name = "dinov2_base"


class nnUNetTrainerUperNetViT_DINOv3_Large(nnUNetTrainerUperNetViT):
    """DINOv3 ViT-L/16 (the seed recipe's backbone), full fine-tuning: recipe ``dinov3_large``."""

    recipe_name = "dinov3_large"


class nnUNetTrainerUperNetViT_DINOv3_Large_LoRA(nnUNetTrainerUperNetViT):
    """DINOv3 ViT-L/16 with LoRA (rank 8) on the attention qkv; decoder fully trained: ``dinov3_large_lora``."""

    recipe_name = "dinov3_large_lora"


class nnUNetTrainerUperNetViT_DINOv3_7B_LoRA(nnUNetTrainerUperNetViT):
    """DINOv3 ViT-7B/16 with LoRA for one 24 GB GPU: the backbone stored in bfloat16 (built on the meta
    device and filled from the official file, 13.4 GB, never a float32 copy) with gradient checkpointing,
    LoRA adapters and decoder in float32, the ViTDet pyramid (0.09B parameters instead of 0.20B at width
    4096): recipe ``dinov3_7b_lora``."""

    recipe_name = "dinov3_7b_lora"


class nnUNetTrainerUperNetViT_RETFound(nnUNetTrainerUperNetViT):
    """RETFound MAE ViT-L/16 (retinal images), full fine-tuning: recipe ``retfound``."""

    recipe_name = "retfound"


class nnUNetTrainerUperNetViT_VisionFM(nnUNetTrainerUperNetViT):
    """VisionFM ViT-B/16 (ophthalmic images), full fine-tuning: recipe ``visionfm``."""

    recipe_name = "visionfm"


__all__ = [
    "nnUNetTrainerUperNetViT",
    "nnUNetTrainerUperNetViT_DINOv2_Base",
    "nnUNetTrainerUperNetViT_DINOv3_Large",
    "nnUNetTrainerUperNetViT_DINOv3_Large_LoRA",
    "nnUNetTrainerUperNetViT_DINOv3_7B_LoRA",
    "nnUNetTrainerUperNetViT_RETFound",
    "nnUNetTrainerUperNetViT_VisionFM",
]
