"""Official checkpoint layouts -> timm state dicts.

Each converter takes the tensors of an official file (already unwrapped from its container) and the
timm model they are meant for, and returns ``(state_dict in timm names, dropped key names)``.
Facts are from the official repositories (facebookresearch/dinov2, facebookresearch/dinov3,
rmaphoh/RETFound_MAE and rmaphoh/RETFound, ABILab-CUHK/VisionFM); see docs/how-to/checkpoints.md.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Mapping, Tuple

import torch
from torch import nn

StateDict = Dict[str, torch.Tensor]

CHECKPOINT_FORMATS = ("auto", "timm", "dinov2", "dinov3", "retfound_mae", "visionfm")

# keys that are never backbone weights: SSL heads, MAE decoder, masking tokens
_DROP_PATTERNS = (
    r"^(dino_head|ibot_head|head|projectors)\.",
    r"^decoder_",  # MAE decoder: decoder_embed, decoder_blocks, decoder_norm, decoder_pred, decoder_pos_embed
    r"^mask_token$",
    r"^masked_embed$",  # iBOT/VisionFM student
    r"^local_cls_norm\.",  # DINOv3: "never used during eval"
    r"\.bias_mask$",  # DINOv3: applied to qkv.bias below
    r"^rope_embed\.periods$",  # DINOv3: handled explicitly
)


def unwrap_container(obj: Any) -> Tuple[Mapping[str, Any], str]:
    """The tensors of a checkpoint file and where they were: ``teacher`` (DINOv2/VisionFM/RETFound-DINOv2
    training files), ``model`` (MAE/RETFound), ``state_dict``, or the top level."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a dict of tensors, got {type(obj).__name__}")
    for key in ("teacher", "model", "state_dict", "module", "student"):
        if isinstance(obj.get(key), Mapping):
            return obj[key], key
    return obj, "top level"


def strip_prefixes(state: Mapping[str, Any]) -> StateDict:
    """``module.`` (DDP) and ``backbone.`` (SSL wrappers) removed; non-tensors (e.g. args) skipped."""
    out: StateDict = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in ("module.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def unchunk_blocks(state: StateDict) -> StateDict:
    """DINOv2 training files chunk blocks as ``blocks.{chunk}.{i}`` with ``i`` already global."""
    if not any(re.match(r"^blocks\.\d+\.\d+\.", k) for k in state):
        return state
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}


def detect_format(state: StateDict, container: str) -> str:
    """Best guess of the official layout from the key names (after prefix stripping)."""
    if "storage_tokens" in state or "rope_embed.periods" in state:
        return "dinov3"
    if any(k.startswith("decoder_") for k in state):
        return "retfound_mae"
    if any(re.search(r"\.ls1\.gamma$", k) for k in state) and ("mask_token" in state or container == "teacher" or "register_tokens" in state):
        return "dinov2"
    if any(re.search(r"\.mlp\.w12\.", k) for k in state) or "register_tokens" in state:
        return "dinov2"
    if container == "teacher" or "masked_embed" in state:
        return "visionfm"
    return "timm"


def _drop(state: StateDict) -> Tuple[StateDict, List[str]]:
    kept, dropped = {}, []
    for key, value in state.items():
        if any(re.search(p, key) for p in _DROP_PATTERNS):
            dropped.append(key)
        else:
            kept[key] = value
    return kept, dropped


def convert_dinov2(state: StateDict, vit: nn.Module) -> StateDict:
    """DINOv2 hub/training (and RETFound-DINOv2) -> timm ``vit_*_patch14[_reg4]_dinov2``.

    ``register_tokens`` -> ``reg_token``; SwiGLU ``mlp.w12``/``mlp.w3`` -> ``mlp.fc1``/``mlp.fc2`` (timm keeps
    w12 packed, gate first, as the official code); for timm models without a class position
    (``no_embed_class``, the reg4 ones) the cls position is folded into ``cls_token``.
    """
    out: StateDict = {}
    for key, value in state.items():
        key = key.replace("register_tokens", "reg_token")
        key = re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", key)
        key = re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", key)
        out[key] = value
    if getattr(vit, "no_embed_class", False) and "pos_embed" in out and "cls_token" in out:
        pos = out["pos_embed"]
        if math.isqrt(pos.shape[1] - 1) ** 2 == pos.shape[1] - 1:  # [cls position, square grid]
            out["cls_token"] = out["cls_token"] + pos[:, :1]
            out["pos_embed"] = pos[:, 1:]
    return out


def convert_dinov3(state: StateDict, vit: nn.Module, bias_masks: Mapping[str, torch.Tensor]) -> StateDict:
    """DINOv3 official -> timm Eva ``vit_*_patch16_dinov3[_qkvb]``.

    ``storage_tokens`` -> ``reg_token``; ``ls{1,2}.gamma`` -> ``gamma_{1,2}``; SwiGLU ``w1/w2/w3`` ->
    ``fc1_g/fc1_x/fc2``. The effective qkv bias is ``qkv.bias * bias_mask``: its k part must be zero
    (timm fixes it at zero); q and v go to ``q_bias``/``v_bias``, or must be zero for the no-bias variant.
    """
    own = vit.state_dict()
    out: StateDict = {}
    for key, value in state.items():
        if key.endswith("attn.qkv.bias"):
            mask = bias_masks.get(key[: -len("bias")] + "bias_mask")
            bias = value * mask if mask is not None else value
            q, k, v = bias.chunk(3)
            if k.abs().max() > 0:
                raise ValueError(f"{key}: the k part of qkv.bias * bias_mask is not zero; timm's DINOv3 cannot represent it")
            q_key = key.replace("qkv.bias", "q_bias")
            if getattr(vit, "rope", None) is None:  # not a DINOv3 model: let the strict check report it
                out[key] = bias
            elif q_key in own:
                out[q_key], out[key.replace("qkv.bias", "v_bias")] = q, v
            elif q.abs().max() > 0 or v.abs().max() > 0:
                raise ValueError(
                    f"{key}: this file has non-zero q/v biases (qkv.bias * bias_mask), which the no-bias "
                    f"DINOv3 architecture drops; use backbone 'dinov3_qkvb' for it"
                )
            continue
        key = key.replace("storage_tokens", "reg_token")
        key = re.sub(r"\.ls1\.gamma$", ".gamma_1", key)
        key = re.sub(r"\.ls2\.gamma$", ".gamma_2", key)
        key = re.sub(r"\.mlp\.w1\.", ".mlp.fc1_g.", key)
        key = re.sub(r"\.mlp\.w2\.", ".mlp.fc1_x.", key)
        key = re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", key)
        out[key] = value
    return out


def to_timm(obj: Any, vit: nn.Module, checkpoint_format: str = "auto") -> Tuple[StateDict, str, Dict[str, torch.Tensor]]:
    """Official file contents -> ``(timm state dict, format, extras)``; extras holds DINOv3's
    ``rope_periods`` (the file's values, which are bf16-rounded; the model must use them)."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"unknown checkpoint_format {checkpoint_format!r}; choose one of {', '.join(CHECKPOINT_FORMATS)}")
    raw, container = unwrap_container(obj)
    state = unchunk_blocks(strip_prefixes(raw))
    fmt = detect_format(state, container) if checkpoint_format == "auto" else checkpoint_format
    extras: Dict[str, torch.Tensor] = {}
    if fmt == "dinov3" and "rope_embed.periods" in state:
        extras["rope_periods"] = state["rope_embed.periods"]
    bias_masks = {k: v for k, v in state.items() if k.endswith(".bias_mask")}
    state, _ = _drop(state)
    if fmt == "dinov2":
        state = convert_dinov2(state, vit)
    elif fmt == "dinov3":
        state = convert_dinov3(state, vit, bias_masks)
    # retfound_mae, visionfm and timm keep timm's names once heads and decoders are dropped
    return state, fmt, extras
