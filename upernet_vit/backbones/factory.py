"""Build a plain ViT backbone with timm: presets, any timm ViT name, local checkpoints."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Dict, Mapping, Optional, Tuple

import timm
import torch
from torch import nn

from .checkpoint import first_line, load_backbone_checkpoint
from .meta import build_on_meta, check_materialized
from .pos_embed import use_pos_embed_interpolation
from .presets import IMAGENET_MEAN, IMAGENET_STD, BackbonePreset, resolve_norm_stats, resolve_preset


class ViTBackbone(nn.Module):
    """A timm ViT (``self.vit``) plus what the decoder needs to know about it.

    Attributes: ``patch_size`` (int), ``embed_dim`` (D), ``depth`` (number of blocks),
    ``num_prefix_tokens`` (cls + registers), ``mean``/``std`` (per input channel, in [0, 1] units).
    """

    def __init__(self, vit: nn.Module, name: str, mean: Tuple[float, ...], std: Tuple[float, ...]) -> None:
        super().__init__()
        self.vit = vit
        self.name = name
        patch = tuple(vit.patch_embed.patch_size)
        if patch[0] != patch[1]:
            raise ValueError(f"backbone {name!r} has a non-square patch {patch}; only square patches are supported")
        self.patch_size: int = int(patch[0])
        self.embed_dim: int = int(vit.embed_dim)
        self.depth: int = len(vit.blocks)
        self.num_prefix_tokens: int = int(getattr(vit, "num_prefix_tokens", 0))
        self.mean = tuple(mean)
        self.std = tuple(std)

    @property
    def patch_embed_dtype(self) -> torch.dtype:
        """The dtype the backbone stores its weights in (its input is cast to it)."""
        return self.vit.patch_embed.proj.weight.dtype


def channel_stats(rgb: Tuple[float, ...], in_chans: int) -> Tuple[float, ...]:
    """Per-channel stats for ``in_chans`` inputs from RGB stats: the RGB mean for 1 channel
    (matching a patch embedding summed over RGB), RGB repeated cyclically for more."""
    if in_chans == len(rgb):
        return tuple(rgb)
    if in_chans == 1:
        return (sum(rgb) / len(rgb),)
    return tuple(rgb[i % len(rgb)] for i in range(in_chans))


def pretrained_timm_name(backbone: str, timm_name: str, preset: Optional[BackbonePreset]) -> str:
    """``architecture.tag`` of timm's pretrained weights: the preset's tag (dinov2 -> ``.lvd142m``, dinov3 ->
    ``.lvd1689m``), or a timm name as given (with its tag, or timm's default one). A ValueError when timm
    has no such weights."""
    if preset is not None:
        if preset.pretrained_tag is None:
            raise ValueError(
                f"backbone {backbone!r} has no weights on timm's hub; download the official file and set "
                f"checkpoint_path (see docs/how-to/checkpoints.md)"
            )
        name = f"{timm_name}.{preset.pretrained_tag}"
    else:
        name = timm_name
    if not timm.is_model_pretrained(name):
        tags = timm.list_pretrained(name.split(".")[0] + ".*")
        raise ValueError(
            f"timm has no pretrained weights {name!r}"
            + (f"; the tags it has: {', '.join(tags[:10])}" if tags else "; set checkpoint_path to a local file")
        )
    return name


def _unavailable(name: str, err: BaseException) -> str:
    from huggingface_hub import constants

    offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
    first = first_line(err).rstrip(".")
    return (
        f"cannot get timm's pretrained weights {name!r}{offline}: {first}. Online, timm downloads them into the "
        f"Hugging Face cache {constants.HF_HUB_CACHE}; offline, they must be there already (copy that cache "
        f"folder from a machine that has them, or set HF_HOME). Or download the official file and set "
        f"checkpoint_path instead of pretrained"
    )


def create_backbone(
    backbone: str,
    backbone_size: Optional[str] = None,
    in_chans: int = 3,
    checkpoint_path: Optional[str] = None,
    backbone_kwargs: Optional[Mapping[str, Any]] = None,
    checkpoint_format: str = "auto",
    trust_checkpoint: bool = False,
    norm_stats: Optional[str] = None,
    pretrained: bool = False,
    drop_path_rate: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> ViTBackbone:
    """A timm ViT for a preset (``"dinov2"``, ``"dinov2_reg4"``, ``"dinov3"``, ``"retfound"``,
    ``"visionfm"`` with a ``backbone_size``) or any timm ViT name (``backbone_size=None``).

    ``backbone_kwargs`` go to ``timm.create_model`` (e.g. ``dict(depth=4, embed_dim=32, num_heads=2)``
    for tests, ``img_size``). ``drop_path_rate``: stochastic depth of the blocks (timm's linear rule).
    The model is built with ``dynamic_img_size=True``
    (any input size that is a multiple of the patch), no classifier, random weights, and the family's
    official position-embedding interpolation. A local ``checkpoint_path`` (official layouts or timm;
    ``checkpoint_format="auto"`` detects which) is then loaded strictly. ``pretrained=True`` instead loads
    timm's weights (:func:`pretrained_timm_name`): timm takes them from the Hugging Face cache, downloading
    them when online. ``norm_stats`` picks named input statistics (e.g. ``"visionfm_oct"``); default: the
    preset's.

    ``dtype``: the storage dtype of the weights. Below float32, a backbone with weights to load is built on
    the meta device and filled from the file or tag in ``dtype`` (:mod:`.meta`), so no float32 copy of it
    is ever in memory; without weights it is built in float32 and cast.
    """
    if not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")
    timm_name, preset = resolve_preset(backbone, backbone_size)
    if pretrained and checkpoint_path:
        raise ValueError(
            f"checkpoint_path {checkpoint_path!r} and pretrained=True both name backbone weights; keep one"
        )
    kwargs: Dict[str, Any] = dict(preset.timm_kwargs) if preset else {}
    kwargs.update(backbone_kwargs or {})
    for reserved in ("pretrained", "in_chans", "num_classes", "dynamic_img_size", "drop_path_rate"):
        if reserved in (backbone_kwargs or {}):
            hint = {"pretrained": "use pretrained=True or checkpoint_path",
                    "drop_path_rate": "it is the model option drop_path_rate"}.get(reserved, "it is set by upernet-vit")
            raise ValueError(f"backbone_kwargs may not contain {reserved!r}: {hint}")
    kwargs["drop_path_rate"] = float(drop_path_rate)
    if not timm.is_model(timm_name):
        matches = timm.list_models(f"*{timm_name}*")[:8]
        raise ValueError(
            f"backbone {backbone!r} is neither a preset nor a timm model name"
            + (f"; similar timm names: {', '.join(matches)}" if matches else "")
        )
    source = pretrained_timm_name(backbone, timm_name, preset) if pretrained else timm_name
    on_meta = dtype != torch.float32 and (pretrained or bool(checkpoint_path))
    with build_on_meta(dtype) if on_meta else nullcontext():
        vit = _create_and_load(source, timm_name, preset, in_chans, kwargs, pretrained, checkpoint_path,
                               checkpoint_format, trust_checkpoint)
    if on_meta:
        check_materialized(vit, checkpoint_path or f"timm's pretrained weights {source!r}")
    vit.to(dtype)  # what the file did not hold (RoPE periods timm computed, a random patch embedding's buffers)
    if norm_stats is not None or preset is not None:
        mean, std = resolve_norm_stats(norm_stats or preset.norm_stats)  # type: ignore[union-attr]
    else:
        mean = tuple(vit.pretrained_cfg.get("mean", IMAGENET_MEAN))
        std = tuple(vit.pretrained_cfg.get("std", IMAGENET_STD))
    return ViTBackbone(vit, timm_name, channel_stats(mean, in_chans), channel_stats(std, in_chans))


def _create_and_load(
    source: str, timm_name: str, preset: Optional[BackbonePreset], in_chans: int, kwargs: Dict[str, Any],
    pretrained: bool, checkpoint_path: Optional[str], checkpoint_format: str, trust_checkpoint: bool,
) -> nn.Module:
    """The timm ViT ``source`` with the family's RoPE and pos-embed rules, its weights loaded from timm's
    hub (``pretrained``) or ``checkpoint_path``."""
    try:
        vit = timm.create_model(
            source, pretrained=pretrained, in_chans=in_chans, num_classes=0, dynamic_img_size=True, **kwargs
        )
    except OSError as err:  # huggingface_hub: offline without a cached copy, no connection, 401/403/404
        raise FileNotFoundError(_unavailable(source, err)) from err
    except TypeError as err:
        if "dynamic_img_size" in str(err):
            raise ValueError(f"timm model {timm_name!r} is not a plain ViT (no dynamic_img_size support)") from err
        raise TypeError(f"timm rejected backbone_kwargs {dict(kwargs)} for {timm_name!r}: {err}") from err
    if not (hasattr(vit, "forward_intermediates") and hasattr(vit, "blocks") and hasattr(vit, "patch_embed")):
        raise ValueError(
            f"timm model {timm_name!r} is not a plain ViT (it needs patch_embed, blocks and "
            f"forward_intermediates); hierarchical models such as Swin already have a pyramid"
        )
    rope = getattr(vit, "rope", None)
    if isinstance(getattr(rope, "periods", None), torch.Tensor):
        # persistent, so save_pretrained keeps the (official, bf16-rounded) periods a checkpoint brings
        rope.register_buffer("periods", rope.periods, persistent=True)
    if pretrained and preset is not None and preset.checkpoint_format == "dinov3" and isinstance(getattr(rope, "periods", None), torch.Tensor):
        # timm's DINOv3 files leave out the periods and timm recomputes them in fp32; the official files
        # store them rounded to bf16, and the RoPE angles (so the features) follow the stored values
        rope.periods = rope.periods.to(torch.bfloat16).float()
    use_pos_embed_interpolation(vit, preset.pos_embed_interpolation if preset else "timm")
    if checkpoint_path:
        load_backbone_checkpoint(
            vit, checkpoint_path, checkpoint_format, trust_checkpoint,
            preset.pos_embed_interpolation if preset else "timm",
            expected_format=preset.checkpoint_format if preset else None,
        )
    return vit
