"""Head weights from HuggingFace transformers and mmsegmentation onto :class:`UperNetHead`.

Both libraries use the same module tree; only leaf names differ:

=====================================  ==================================  ===========================
ours (``UperNetHead``)                 HF ``UperNetHead``                  mmseg ``UPerHead``
=====================================  ==================================  ===========================
``ppm.stages.{i}.conv/norm``           ``psp_modules.{i}.1.conv/batch_norm``  ``psp_modules.{i}.1.conv/bn``
``ppm.bottleneck.*``                   ``bottleneck.*``                    ``bottleneck.*``
``fpn.lateral_convs.{i}.*``            ``lateral_convs.{i}.*``             ``lateral_convs.{i}.*``
``fpn.fpn_convs.{i}.*``                ``fpn_convs.{i}.*``                 ``fpn_convs.{i}.*``
``fpn.fpn_bottleneck.*``               ``fpn_bottleneck.*``                ``fpn_bottleneck.*``
``classifier.*``                       ``classifier.*``                    ``conv_seg.*``
``aux_head.convs.{i}.*``               ``auxiliary_head.convs.{i}.*``      ``auxiliary_head.convs.{i}.*``
``aux_head.classifier.*``              ``auxiliary_head.classifier.*``     ``auxiliary_head.conv_seg.*``
=====================================  ==================================  ===========================

The target head must be built with ``norm="batchnorm"`` (their norm) and their channel counts.
Full-model state dicts are accepted: ``decode_head.``/``auxiliary_head.`` select the parts and
everything else (``backbone.*``, ``neck.*``) is ignored.

mmseg's BEiT/MAE segmentors put a ``Feature2Pyramid`` neck between the ViT and the head; it is our
:class:`~upernet_vit.vit_adapter.SimpleFeaturePyramid` (with ``norm="batchnorm"``) under other names, and
:func:`from_mmseg_neck` converts it:

=====================================  ==================================
ours (``SimpleFeaturePyramid``)        mmseg ``Feature2Pyramid``
=====================================  ==================================
``up4.{0,1,3}.*`` (deconv, BN, deconv)  ``upsample_4x.{0,1,3}.*``
``up2.*``                              ``upsample_2x.0.*``
=====================================  ==================================

Their backbones (mmseg's own ``BEiT``/``MAE`` modules, relative position bias) are not converted.
"""
from __future__ import annotations

import re
from typing import Dict, Mapping, Sequence, Tuple

import torch

_Rule = Tuple[str, str]

# (regex on the key inside decode_head / auxiliary_head, replacement)
_COMMON_DECODE: Sequence[_Rule] = (
    (r"^psp_modules\.(\d+)\.1\.", r"ppm.stages.\1."),
    (r"^bottleneck\.", "ppm.bottleneck."),
    (r"^(lateral_convs|fpn_convs)\.", r"fpn.\1."),
    (r"^fpn_bottleneck\.", "fpn.fpn_bottleneck."),
)


def _convert(
    state_dict: Mapping[str, torch.Tensor], norm_name: str, classifier_name: str, source: str
) -> Dict[str, torch.Tensor]:
    decode_rules = (*_COMMON_DECODE, (rf"^{classifier_name}\.", "classifier."))
    aux_rules = ((r"^convs\.", "convs."), (rf"^{classifier_name}\.", "classifier."))
    has_prefix = any(k.startswith(("decode_head.", "auxiliary_head.")) for k in state_dict)
    out: Dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if has_prefix:
            if key.startswith("decode_head."):
                inner, rules, target = key[len("decode_head.") :], decode_rules, ""
            elif key.startswith("auxiliary_head."):
                inner, rules, target = key[len("auxiliary_head.") :], aux_rules, "aux_head."
            else:
                continue  # backbone, neck: not the head's
        else:
            inner, rules, target = key, decode_rules, ""
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, inner)
            if n:
                break
        else:
            unknown.append(key)
            continue
        new = re.sub(rf"\.{norm_name}\.", ".norm.", new)
        out[target + new] = value
    if unknown:
        raise ValueError(
            f"{len(unknown)} key(s) are not part of a {source} UperNet head: {unknown[:10]}"
            " (an FCN head with concat_input or a different decoder?)"
        )
    if not out:
        raise ValueError(f"no {source} UperNet head keys found (expected e.g. 'decode_head.fpn_bottleneck.conv.weight')")
    return out


def from_hf_upernet(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """HF transformers ``UperNetHead`` (or ``UperNetForSemanticSegmentation``) weights -> ours.

    Load the result into ``UperNetHead(in_channels, channels=config.hidden_size, num_classes=...,
    pool_scales=config.pool_scales, norm="batchnorm", aux_head=<has auxiliary_head>)``.
    """
    return _convert(state_dict, "batch_norm", "classifier", "HuggingFace")


def from_mmseg_upernet(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """mmsegmentation ``UPerHead`` (+ ``FCNHead`` auxiliary) weights -> ours.

    Accepts a segmentor state dict (``decode_head.*``, ``auxiliary_head.*``, ``backbone.*``) or the
    bare head's. mmseg checkpoints wrap it as ``{"state_dict": ...}``: pass ``ckpt["state_dict"]``.
    """
    return _convert(state_dict, "bn", "conv_seg", "mmsegmentation")


_NECK_RULES: Sequence[_Rule] = ((r"^upsample_4x\.([013])\.", r"up4.\1."), (r"^upsample_2x\.0\.", "up2."))


def from_mmseg_neck(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """mmsegmentation ``Feature2Pyramid`` neck weights (the BEiT/MAE segmentors') -> ours.

    Load the result into ``SimpleFeaturePyramid(embed_dim, norm="batchnorm")``, e.g. ``model.adapter`` of
    ``UperNetViT(..., norm="batchnorm")`` (``pyramid: simple``, the default). Accepts a segmentor state dict
    (``neck.*`` selected, the rest ignored) or the bare neck's. A neck built with ``rescales=[2, 1, 0.5, 0.25]``
    (no 4x level) has no counterpart here and is refused.
    """
    neck = {k[len("neck."):]: v for k, v in state_dict.items() if k.startswith("neck.")}
    if not neck and not any(k.startswith(("decode_head.", "backbone.", "auxiliary_head.")) for k in state_dict):
        neck = dict(state_dict)
    if not any(k.startswith("upsample_4x.") for k in neck):
        raise ValueError(
            "no mmsegmentation Feature2Pyramid 4x level found (expected e.g. 'neck.upsample_4x.0.weight'); a neck "
            "with rescales [2, 1, 0.5, 0.25] has none, and SimpleFeaturePyramid's levels are 4x, 2x, 1x, 0.5x"
        )
    out: Dict[str, torch.Tensor] = {}
    for key, value in neck.items():
        for pattern, repl in _NECK_RULES:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            raise ValueError(f"neck key {key!r} is not part of mmsegmentation's Feature2Pyramid (4x, 2x, 1x, 0.5x)")
    return out
