"""UperNetViT: a plain ViT backbone, a simple feature pyramid and an UperNet head, end to end.

    image [B, C, H, W]
      -> pad to multiples of the patch p      [B, C, p*h, p*w]         h = ceil(H/p), w = ceil(W/p)
      -> ViT, 4 tapped blocks                  4 x [B, D, h, w]         (backbones/, vit_adapter.py)
      -> SimpleFeaturePyramid                  [B, D, 4h, 4w], [B, D, 2h, 2w], [B, D, h, w], [B, D, h/2, w/2]
         (or ViTDetFeaturePyramid: the same strides, C = hidden_size channels each)
      -> UperNetHead (PPM + FPN)               [B, K, 4h, 4w]           (head.py, ppm.py, fpn.py)
      -> upsampler, crop                       [B, K, H, W]             (upsampler.py)
"""
from __future__ import annotations

import copy
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import lora, pretrained
from .backbones import create_backbone, resolve_backbone_size
from .config import (Config, LoraConfig, ModelConfig, check_backbone_storage, config_to_yaml, load_config,
                     model_config)
from .head import UperNetHead
from .precision import Precision, precision_dtype
from .layers import resize
from .upsampler import build_upsampler
from .vit_adapter import build_feature_pyramid, extract_feature_maps, prepare_vit_for_taps, resolve_feature_indices


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad ``[B, C, H, W]`` at the bottom/right to multiples of ``multiple``.

    Reflect where the image is larger than the pad (no artificial edges), replicate otherwise
    (reflect cannot pad a 5 px image by 11 px).
    """
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if pad_w:
        x = F.pad(x, (0, pad_w, 0, 0), mode="reflect" if pad_w < w else "replicate")
    if pad_h:
        x = F.pad(x, (0, 0, 0, pad_h), mode="reflect" if pad_h < h else "replicate")
    return x


class UperNetViT(nn.Module):
    """Semantic segmentation with a plain ViT: ``[B, in_chans, H, W] -> [B, num_classes, H, W]``.

    ``UperNetViT(backbone="dinov2", backbone_size="base", num_classes=4, **options)``, or
    ``UperNetViT(model_config, **options)`` with a :class:`~upernet_vit.config.ModelConfig`. The options
    are its fields (see their comments; the YAML ``model:`` section), given flat:

    - ``backbone``: preset (``dinov2``, ``dinov2_reg4``, ``dinov3``, ``retfound``, ``visionfm``, ...) or a
      timm ViT name. ``backbone_size``: the preset's size; ``None`` for a timm name or a one-size preset.
    - ``num_classes`` (K, background included), ``in_chans`` (1 = grayscale, 3 = RGB, any positive int).
    - ``checkpoint_path`` (local official DINOv2/DINOv3/RETFound/VisionFM or timm file; ``None``: random
      init), or ``pretrained=True`` (timm's weights: the preset's tag, e.g. ``vit_base_patch14_dinov2.lvd142m``,
      or a timm name's own tag; downloaded into the Hugging Face cache when online), ``checkpoint_format``, ``trust_checkpoint``, ``norm_stats``, ``backbone_kwargs`` (to timm).
    - ``feature_indices`` (default ``[d/4-1, d/2-1, 3d/4-1, d-1]``), ``freeze_backbone``,
      ``gradient_checkpointing`` (timm's, same results, less memory), ``drop_path_rate`` (stochastic depth).
    - decoder: ``hidden_size`` (the UperNet width), ``pool_scales``, ``norm``
      (``layernorm`` default: trains at batch size 1; ``batchnorm`` for mmseg/HF weights), ``dropout``,
      ``upsampler`` (``bilinear`` or ``progressive``), ``aux_head``, ``aux_channels``, ``pyramid``
      (``simple``, the default, or ``vitdet``).

    The model computes the reference math (resize, concat, conv); ``upernet_vit.fast.optimize(model)``
    swaps in faster, leaner equivalents.
    """

    def __init__(
        self,
        backbone: Union[str, ModelConfig],
        backbone_size: Optional[str] = None,
        num_classes: Optional[int] = None,
        **options: Any,
    ) -> None:
        super().__init__()
        if isinstance(backbone, ModelConfig):  # UperNetViT(config, **overrides)
            named = {"backbone_size": backbone_size} if backbone_size is not None else {}
            base: Optional[ModelConfig] = backbone
        else:
            named, base = {"backbone": backbone, "backbone_size": backbone_size}, None
        if num_classes is not None:
            named["num_classes"] = num_classes
        cfg = model_config(base, **named, **options)
        if cfg.num_classes is None:
            raise ValueError("num_classes is not set: pass num_classes=... (background included) or set model.num_classes")
        cfg.backbone_size = resolve_backbone_size(cfg.backbone, cfg.backbone_size)
        check_backbone_storage(cfg.backbone_dtype, cfg.freeze_backbone, lora=False, how="api")  # before the build
        try:  # fail now, not at save time, if the config cannot be written
            config_to_yaml(Config(model=cfg))
        except Exception as err:
            raise ValueError(
                f"backbone_kwargs {cfg.backbone_kwargs} must hold plain values (numbers, strings, lists) so "
                f"save_pretrained can write them to config.yaml: {err}"
            ) from err
        self.config = cfg
        self.lora_config: Optional[LoraConfig] = None
        self.check_finite = True  # check_input: refuse NaN/infinite input values
        # what the model was trained on (normalization, intensity scale, label values, patch size), set by the
        # trainer; save_pretrained / from_pretrained keep it as preprocessing.json. None: no record.
        self.preprocessing: Optional[Dict[str, Any]] = None
        self.backbone = create_backbone(
            cfg.backbone, cfg.backbone_size, cfg.in_chans, cfg.checkpoint_path, cfg.backbone_kwargs,
            checkpoint_format=cfg.checkpoint_format, trust_checkpoint=cfg.trust_checkpoint, norm_stats=cfg.norm_stats,
            pretrained=cfg.pretrained, drop_path_rate=cfg.drop_path_rate, dtype=precision_dtype(cfg.backbone_dtype),
        )  # in backbone_dtype, filled straight from its weights file; the decoder stays float32
        self.feature_indices = resolve_feature_indices(self.backbone.depth, cfg.feature_indices)
        prepare_vit_for_taps(self.backbone, self.feature_indices)
        d = cfg.decoder
        self.adapter = build_feature_pyramid(d.pyramid, self.backbone.embed_dim, d.hidden_size, d.norm)
        self.head = UperNetHead(
            self.adapter.out_channels, channels=d.hidden_size, num_classes=cfg.num_classes,
            pool_scales=d.pool_scales, norm=d.norm, dropout=d.dropout, aux_head=d.aux_head, aux_channels=d.aux_channels,
        )
        self.upsampler = build_upsampler(d.upsampler, cfg.num_classes, d.norm)
        self.set_backbone_trainable(not cfg.freeze_backbone)
        if cfg.gradient_checkpointing:
            self.backbone.vit.set_grad_checkpointing(True)

    # ------------------------------------------------------------------ properties
    @property
    def num_classes(self) -> int:
        return int(self.config.num_classes)  # type: ignore[arg-type]

    @property
    def in_chans(self) -> int:
        return self.config.in_chans

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_size

    @property
    def mean(self) -> Tuple[float, ...]:
        """Per-channel input mean (images scaled to [0, 1]) of the backbone's pretraining."""
        return self.backbone.mean

    @property
    def std(self) -> Tuple[float, ...]:
        return self.backbone.std

    @property
    def lora_enabled(self) -> bool:
        return self.lora_config is not None

    # ------------------------------------------------------------------ forward
    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` checked and in the weights' dtype. Shape ``[B, in_chans, H, W]``, B, H, W >= 1; integer
        images are refused (scale them to [0, 1] and normalize with ``model.mean/std`` first); floating
        inputs of another dtype are cast. With ``check_finite`` (default True) a NaN or infinite value is a
        ValueError: one such pixel would make every logit of its image NaN. The check is one pass over the
        input (benchmarks/input_check.py) and is skipped under torch.compile and torch.export."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != self.in_chans:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"UperNetViT expects a 4-D tensor [B, {self.in_chans}, H, W] (in_chans={self.in_chans}), "
                f"got {got}"
            )
        if x.shape[0] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"UperNetViT got an empty input of shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(
                f"UperNetViT expects a floating-point image, got dtype {x.dtype}: scale it to [0, 1] "
                f"(e.g. x.float() / 255 for 8-bit) and normalize with model.mean and model.std"
            )
        check = self.check_finite and not torch.compiler.is_compiling()
        if check and not bool(torch.isfinite(x).all()):
            bad = (~torch.isfinite(x)).flatten(1).sum(1)
            where = ", ".join(f"image {i}: {int(n)}" for i, n in enumerate(bad.tolist()) if n)
            raise ValueError(
                f"UperNetViT got non-finite input values (NaN or infinity) ({where} of {x[0].numel()} values): "
                f"every logit of such an image would be NaN. Replace them with finite values (or set "
                f"model.check_finite = False to skip this check)"
            )
        weight_dtype = next(self.head.parameters()).dtype
        if x.dtype != weight_dtype:
            x = x.to(weight_dtype)
            if check and torch.finfo(weight_dtype).max < 1e38 and not bool(torch.isfinite(x).all()):
                raise ValueError(
                    f"UperNetViT input values overflow the model's dtype {weight_dtype} (largest "
                    f"{torch.finfo(weight_dtype).max:g}); normalize the image first (model.mean, model.std)"
                )
        return x

    def check_device(self, device: torch.device) -> None:
        """A ValueError if ``device`` cannot run the backbone's storage dtype: float16 on the CPU, bfloat16
        on a GPU without bfloat16 support."""
        Precision(storage=self.config.backbone_dtype).check_device(device)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """:func:`pad_to_multiple` of the patch size; the export formulation overrides it (upernet_vit.export)."""
        return pad_to_multiple(x, self.patch_size)

    def backbone_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The 4 tapped ViT maps before the pyramid: ``[B, in_chans, H, W] -> 4 x [B, D, ceil(H/p), ceil(W/p)]``."""
        return self.tapped_maps(self.pad(self.check_input(x)))

    def tapped_maps(self, padded: torch.Tensor) -> List[torch.Tensor]:
        """The backbone's 4 tapped maps of a padded input, computed in the backbone's storage dtype
        (``backbone_dtype``) and returned in the input's."""
        dtype = self.backbone.patch_embed_dtype
        maps = extract_feature_maps(self.backbone.vit, padded.to(dtype), self.feature_indices)
        return [m.to(padded.dtype) for m in maps]

    def forward(
        self, x: torch.Tensor, return_aux: bool = False
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """``[B, in_chans, H, W] -> [B, num_classes, H, W]`` logits, for any H, W >= 1.

        With ``return_aux=True`` (needs ``aux_head=True``): ``(logits, aux_logits)``, both ``[B, K, H, W]``.
        """
        padded = self.pad(self.check_input(x))
        levels = self.adapter(self.tapped_maps(padded))
        if not return_aux:
            return self.to_input_size(self.upsampler, self.head(levels), padded, x)
        logits, aux = self.head(levels, return_aux=True)
        return self.to_input_size(self.upsampler, logits, padded, x), self.to_input_size(resize, aux, padded, x)

    def to_input_size(self, upsample: Callable[[torch.Tensor, Sequence[int]], torch.Tensor], logits: torch.Tensor,
                      padded: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Stride-4 ``[B, K, H_pad/4, W_pad/4]`` -> ``upsample`` to the padded input's size -> crop to ``x``'s."""
        return self.crop(upsample(logits, padded.shape[-2:]), *x.shape[-2:])

    def crop(self, logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``[B, K, H_pad, W_pad] -> [B, K, H, W]``, contiguous: drop the padding. The export twin overrides it."""
        return logits[..., :height, :width].contiguous()

    # ------------------------------------------------------------------ what trains (lora.py)
    set_backbone_trainable = lora.set_backbone_trainable
    enable_lora = lora.enable_lora
    merge_lora = lora.merge_lora

    def parameter_summary(self) -> Dict[str, Dict[str, int]]:
        """``{component: {"total": n, "trainable": n}}`` for backbone, adapter, head, upsampler and ``all``."""
        summary = {}
        for name in ("backbone", "adapter", "head", "upsampler"):
            params = list(getattr(self, name).parameters())
            summary[name] = {
                "total": sum(p.numel() for p in params),
                "trainable": sum(p.numel() for p in params if p.requires_grad),
            }
        summary["all"] = {k: sum(v[k] for v in summary.values()) for k in ("total", "trainable")}
        return summary

    # ------------------------------------------------------------------ config, save, load (pretrained.py)
    def to_config(self) -> Config:
        """The :class:`Config` (model + lora sections) that rebuilds this model."""
        return Config(model=copy.deepcopy(self.config), lora=copy.deepcopy(self.lora_config or LoraConfig()))

    @classmethod
    def from_config(cls, config: Union[str, os.PathLike, Mapping[str, Any], Config], **overrides: Any) -> "UperNetViT":
        """Build from a YAML path, dict or :class:`Config`; ``overrides`` are model options (e.g.
        ``num_classes`` from the dataset). Applies the ``lora`` section when enabled."""
        cfg = load_config(config)
        model_cfg = model_config(cfg.model, **overrides)
        if cfg.lora.enabled and model_cfg.backbone_dtype != "float32":  # LoRA's base is frozen (precision.py)
            model_cfg.freeze_backbone = True
        model = cls(model_cfg)
        if cfg.lora.enabled:
            model.enable_lora(cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.lora_dropout, cfg.lora.target_modules)
        return model

    save_pretrained = pretrained.save_pretrained
    from_pretrained = classmethod(pretrained.from_pretrained)
