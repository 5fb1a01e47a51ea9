"""UperNetViT: a plain ViT backbone, a simple feature pyramid and an UperNet head, end to end."""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import uuid
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import create_backbone
from .config import Config, DecoderConfig, LoraConfig, ModelConfig, config_to_yaml, load_config
from .head import UperNetHead
from .layers import NORM_NAMES, fuse_conv_bn
from .sizes import statically_known_true
from .upsampler import build_upsampler
from .vit_adapter import SimpleFeaturePyramid, extract_feature_maps, prepare_vit_for_taps, resolve_feature_indices

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad ``[B, C, H, W]`` at the bottom/right to multiples of ``multiple``.

    Reflect where the image is larger than the pad (no artificial edges), replicate otherwise
    (reflect cannot pad a 5 px image by 11 px). With symbolic sizes (``torch.export``) the pad is always
    in the graph, possibly of 0 px, so the graph serves every size.
    """
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if not statically_known_true(pad_w == 0):
        x = F.pad(x, (0, pad_w, 0, 0), mode="reflect" if pad_w < w else "replicate")
    if not statically_known_true(pad_h == 0):
        x = F.pad(x, (0, 0, 0, pad_h), mode="reflect" if pad_h < h else "replicate")
    return x


def _current_umask() -> int:
    try:  # Linux: read it without changing it
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_path(path: str) -> None:
    """Flush a file's or a folder's contents (a folder: its entries, e.g. a rename) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, flush it to disk, then rename over ``path``: readers see the old
    file or the new one, never half of one (also after a crash or power loss)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_current_umask())  # some writers (safetensors) create files 0600
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_path(folder)


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


class UperNetViT(nn.Module):
    """Semantic segmentation with a plain ViT: ``[B, in_chans, H, W] -> [B, num_classes, H, W]``.

    Data path (shapes for patch p, ``h = ceil(H/p)``, ``w = ceil(W/p)``, D = ViT width)::

        image [B, C, H, W]
          -> pad to multiples of p            [B, C, p*h, p*w]
          -> ViT, 4 tapped blocks              4 x [B, D, h, w]
          -> SimpleFeaturePyramid              [B, D, 4h, 4w], [B, D, 2h, 2w], [B, D, h, w], [B, D, ceil(h/2), ceil(w/2)]
          -> UperNetHead (PPM + FPN)           [B, K, 4h, 4w]   (stride p/4)
          -> upsampler, crop                   [B, K, H, W]

    Args:
        backbone: preset (``dinov2``, ``dinov2_reg4``, ``dinov3``, ``retfound``, ``visionfm``) or a timm ViT name.
        backbone_size: preset size (``small``/``base``/``large``/...); ``None`` for a timm name.
        num_classes: output channels K (background included).
        in_chans: input channels (1 = grayscale, 3 = RGB, any positive int).
        checkpoint_path: local backbone weights (official DINOv2/DINOv3/RETFound/VisionFM files or timm
            layout); ``None`` = random init.
        decoder_channels: UperNet width (mmseg ``channels``, HF ``hidden_size``).
        pool_scales: PPM grid sizes.
        feature_indices: the 4 tapped blocks; default ``[d/4-1, d/2-1, 3d/4-1, d-1]``.
        upsampler: ``"bilinear"`` or ``"progressive"`` (two learned 2x stages).
        freeze_backbone: ``requires_grad=False`` on every backbone weight.
        backbone_kwargs: passed to ``timm.create_model`` (``depth``, ``embed_dim``, ``img_size``, ...).
        norm: decoder norm, ``"layernorm"`` (default: trains at batch size 1), ``"groupnorm"``,
            ``"batchnorm"`` (mmseg/HF weights), ``"none"``.
        dropout: before the classifiers.
        aux_head: build the auxiliary FCN head on the pyramid's 1x level (stride p: 16 for a patch-16
            ViT; ``forward(x, return_aux=True)``).
        aux_channels: width of the auxiliary head.
        checkpoint_format: ``"auto"`` (detect from the keys), ``"timm"``, ``"dinov2"``, ``"dinov3"``,
            ``"retfound_mae"``, ``"visionfm"``.
        trust_checkpoint: allow full unpickling of ``checkpoint_path`` (only for files you trust).
        norm_stats: named input statistics (``"imagenet"``, ``"dinov3_sat493m"``, ``"visionfm_oct"``, ...);
            default: the preset's.
        gradient_checkpointing: recompute the backbone blocks in the backward pass (timm's
            ``set_grad_checkpointing``): same results, less activation memory, about a third more time.
        winograd: run the head's large 3x3 convs by Winograd F(2x2, 3x3) on CPU in fp32 eager mode
            (:mod:`upernet_vit.winograd`); no effect on CUDA, under autocast, compile or export.
    """

    def __init__(
        self,
        backbone: str,
        backbone_size: Optional[str],
        num_classes: int,
        in_chans: int = 3,
        checkpoint_path: Optional[str] = None,
        decoder_channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        feature_indices: Optional[Sequence[int]] = None,
        upsampler: str = "bilinear",
        freeze_backbone: bool = False,
        backbone_kwargs: Optional[Mapping[str, Any]] = None,
        norm: str = "layernorm",
        dropout: float = 0.1,
        aux_head: bool = False,
        aux_channels: int = 256,
        checkpoint_format: str = "auto",
        trust_checkpoint: bool = False,
        norm_stats: Optional[str] = None,
        gradient_checkpointing: bool = False,
        winograd: bool = True,
    ) -> None:
        super().__init__()
        if norm not in NORM_NAMES:
            raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORM_NAMES)}")
        self.config = ModelConfig(
            backbone=backbone,
            backbone_size=backbone_size,
            num_classes=int(num_classes),
            in_chans=int(in_chans),
            checkpoint_path=checkpoint_path or None,
            checkpoint_format=checkpoint_format,  # type: ignore[arg-type]
            trust_checkpoint=bool(trust_checkpoint),
            norm_stats=norm_stats,
            feature_indices=list(feature_indices) if feature_indices is not None else None,
            freeze_backbone=bool(freeze_backbone),
            gradient_checkpointing=bool(gradient_checkpointing),
            backbone_kwargs=dict(backbone_kwargs or {}),
            decoder=DecoderConfig(
                hidden_size=int(decoder_channels),
                pool_scales=[int(s) for s in pool_scales],
                norm=norm,  # type: ignore[arg-type]
                dropout=float(dropout),
                upsampler=upsampler,  # type: ignore[arg-type]
                aux_head=bool(aux_head),
                aux_channels=int(aux_channels),
                winograd=bool(winograd),
            ),
        )
        try:  # fail now, not at save time, if the config cannot be written
            config_to_yaml(Config(model=self.config))
        except Exception as err:
            raise ValueError(
                f"backbone_kwargs {dict(backbone_kwargs or {})} must hold plain values (numbers, strings, "
                f"lists) so save_pretrained can write them to config.yaml: {err}"
            ) from err
        self.lora_config: Optional[LoraConfig] = None
        self.backbone = create_backbone(
            backbone, backbone_size, int(in_chans), checkpoint_path, backbone_kwargs,
            checkpoint_format=checkpoint_format, trust_checkpoint=trust_checkpoint, norm_stats=norm_stats,
        )
        self.feature_indices = resolve_feature_indices(self.backbone.depth, feature_indices)
        prepare_vit_for_taps(self.backbone.vit, self.feature_indices)
        self.backbone.depth = len(self.backbone.vit.blocks)
        self.adapter = SimpleFeaturePyramid(self.backbone.embed_dim, norm=norm)
        self.head = UperNetHead(
            self.adapter.out_channels,
            channels=decoder_channels,
            num_classes=num_classes,
            pool_scales=pool_scales,
            norm=norm,
            dropout=dropout,
            aux_head=aux_head,
            aux_channels=aux_channels,
            winograd=winograd,
        )
        self.upsampler = build_upsampler(upsampler, num_classes, norm)
        self.set_backbone_trainable(not freeze_backbone)
        if gradient_checkpointing:
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
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != self.in_chans:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"UperNetViT expects a 4-D tensor [B, {self.in_chans}, H, W] (in_chans={self.in_chans}), "
                f"got {got}"
            )
        if x.shape[0] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"UperNetViT got an empty input of shape {tuple(x.shape)}")

    def backbone_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The 4 tapped ViT maps before the pyramid: ``[B, in_chans, H, W] -> 4 x [B, D, ceil(H/p), ceil(W/p)]``."""
        self._check_input(x)
        return extract_feature_maps(self.backbone.vit, pad_to_multiple(x, self.patch_size), self.feature_indices)

    def forward(
        self, x: torch.Tensor, return_aux: bool = False
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """``[B, in_chans, H, W] -> [B, num_classes, H, W]`` logits, for any H, W >= 1.

        With ``return_aux=True`` (needs ``aux_head=True``): ``(logits, aux_logits)``, both ``[B, K, H, W]``.
        """
        self._check_input(x)
        height, width = x.shape[-2:]
        levels = self.adapter(self.backbone_features(x))
        padded_size = [s * self.patch_size for s in levels[2].shape[-2:]]
        out = self.head(levels, return_aux=return_aux)
        if not return_aux:
            return self.upsampler(out, padded_size)[..., :height, :width].contiguous()
        logits, aux = out
        logits = self.upsampler(logits, padded_size)[..., :height, :width].contiguous()
        aux = F.interpolate(aux, size=padded_size, mode="bilinear", align_corners=False)[..., :height, :width]
        return logits, aux.contiguous()

    # ------------------------------------------------------------------ training setup
    def set_backbone_trainable(self, trainable: bool) -> None:
        """Full fine-tuning (True) or a frozen backbone (False). With LoRA on, only LoRA weights train."""
        for name, p in self.backbone.named_parameters():
            p.requires_grad = trainable and (not self.lora_enabled or "lora_" in name)

    def enable_lora(
        self,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.05,
        target_modules: Sequence[str] = ("qkv",),
    ) -> None:
        """Wrap the backbone's ``target_modules`` linears with peft LoRA adapters.

        Afterwards exactly the LoRA weights and the decoder (adapter, head, upsampler) are trainable.
        """
        from peft import LoraConfig as PeftLoraConfig
        from peft.tuners.lora import LoraModel

        if self.lora_enabled:
            raise RuntimeError("LoRA is already enabled on this model; call merge_lora() first to add another")
        if int(rank) < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        names = [n for n, m in self.backbone.vit.named_modules() if isinstance(m, nn.Linear)]
        if not any(n == t or n.endswith("." + t) for n in names for t in targets):
            linears = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise ValueError(
                f"LoRA target_modules {targets} match no linear layer of backbone {self.backbone.name!r}; "
                f"its linear layers are named: {', '.join(linears)}"
            )
        peft_config = PeftLoraConfig(r=int(rank), lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
        self.backbone.vit = LoraModel(self.backbone.vit, peft_config, "default")
        self.lora_config = LoraConfig(
            enabled=True, r=int(rank), lora_alpha=float(alpha), target_modules=targets, lora_dropout=float(dropout)
        )
        self.set_backbone_trainable(True)

    def merge_lora(self) -> None:
        """Fold the LoRA deltas into the backbone weights and drop the adapters (same outputs, plain model)."""
        if not self.lora_enabled:
            raise RuntimeError("merge_lora() needs LoRA enabled; call enable_lora() first")
        self.backbone.vit = self.backbone.vit.merge_and_unload()
        self.lora_config = None
        self.set_backbone_trainable(not self.config.freeze_backbone)

    def fuse(self) -> "UperNetViT":
        """Fold every BatchNorm (``norm="batchnorm"`` models) into the conv before it, for inference.

        Eval mode only; outputs stay the same up to float rounding. The fused model has no BN weights,
        so save the unfused one (``save_pretrained``) for training or sharing. Returns ``self``.
        """
        if self.training:
            raise RuntimeError("fuse() folds BatchNorm running statistics: call model.eval() first")
        fuse_conv_bn(self)
        return self

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

    # ------------------------------------------------------------------ config, save, load
    def to_config(self) -> Config:
        """The :class:`Config` (model + lora sections) that rebuilds this model."""
        return Config(model=copy.deepcopy(self.config), lora=copy.deepcopy(self.lora_config or LoraConfig()))

    @classmethod
    def from_config(cls, config: Union[str, os.PathLike, Mapping[str, Any], Config], **overrides: Any) -> "UperNetViT":
        """Build from a YAML path, dict or :class:`Config`; ``overrides`` replace ``model`` keys
        (e.g. ``num_classes`` from the dataset). Applies the ``lora`` section when enabled."""
        cfg = load_config(config)
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)})
        if unknown:
            raise TypeError(f"from_config got unknown model key(s) {unknown}")
        model_cfg = dataclasses.replace(cfg.model, **overrides)
        if model_cfg.num_classes is None:
            raise ValueError("model.num_classes is not set; set it in the config or pass num_classes=...")
        d = model_cfg.decoder
        model = cls(
            backbone=model_cfg.backbone,
            backbone_size=model_cfg.backbone_size,
            num_classes=model_cfg.num_classes,
            in_chans=model_cfg.in_chans,
            checkpoint_path=model_cfg.checkpoint_path,
            decoder_channels=d.hidden_size,
            pool_scales=d.pool_scales,
            feature_indices=model_cfg.feature_indices,
            upsampler=d.upsampler,
            freeze_backbone=model_cfg.freeze_backbone,
            backbone_kwargs=model_cfg.backbone_kwargs,
            norm=d.norm,
            dropout=d.dropout,
            aux_head=d.aux_head,
            aux_channels=d.aux_channels,
            checkpoint_format=model_cfg.checkpoint_format,
            trust_checkpoint=model_cfg.trust_checkpoint,
            norm_stats=model_cfg.norm_stats,
            gradient_checkpointing=model_cfg.gradient_checkpointing,
            winograd=d.winograd,
        )
        if cfg.lora.enabled:
            model.enable_lora(cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.lora_dropout, cfg.lora.target_modules)
        return model

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        """Write ``model.safetensors`` and ``config.yaml`` (each atomically) into ``directory``."""
        from safetensors.torch import save_file

        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        text = config_to_yaml(self.to_config(), ("model", "lora"))  # before any file changes
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda p: save_file(state, p, metadata={"format": "pt"}))
        atomic_write(os.path.join(directory, CONFIG_NAME), lambda p: _write_text(p, text))

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> "UperNetViT":
        """Rebuild a model written by :meth:`save_pretrained`, on ``device``. The backbone's original
        ``checkpoint_path`` is not read again (the weights come from ``model.safetensors``)."""
        from safetensors.torch import load_file

        directory = os.fspath(directory)
        weights, config_path = os.path.join(directory, WEIGHTS_NAME), os.path.join(directory, CONFIG_NAME)
        for path in (weights, config_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} not found; from_pretrained needs a folder written by save_pretrained()")
        cfg = load_config(config_path)
        original_checkpoint = cfg.model.checkpoint_path
        cfg.model.checkpoint_path = None
        model = cls.from_config(cfg)
        model.config.checkpoint_path = original_checkpoint
        state = load_file(weights)
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{weights} does not match {config_path}: missing {result.missing_keys[:10]}, "
                f"unexpected {result.unexpected_keys[:10]}"
            )
        return model.to(device)
