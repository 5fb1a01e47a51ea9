"""Load a local timm-format checkpoint into a timm ViT, strictly, with readable errors.

Official DINOv2/DINOv3/RETFound/VisionFM file layouts are not converted yet (open issue); this handles
state dicts whose keys already follow timm (``.safetensors``, ``.pth``/``.bin`` with the weights at the top
level or under ``state_dict``/``model``).
"""
from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from typing import Dict, Iterable, List

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

logger = logging.getLogger(__name__)

_HEAD_PREFIXES = ("head.", "head_dist.", "fc_norm.")


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or torch file, unwrapped from ``state_dict``/``model`` containers."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint_path {path!r} does not exist or is not a file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors come in several types
        raise ValueError(
            f"could not read {path!r} as a weights-only torch checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0]}); only tensors are loaded, never arbitrary pickled objects"
        ) from err
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path!r} does not hold a state dict of tensors (top-level keys: {list(obj)[:8]})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def adapt_patch_embed(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """RGB patch-embedding weights ``[D, 3, p, p]`` for ``in_chans`` inputs.

    1 channel: sum over RGB (a gray image = equal R, G, B gives the same response). More: repeat RGB
    cyclically and rescale by ``3 / in_chans`` (timm's rule), so the response keeps its scale
    (exactly, for a constant image, when ``in_chans`` is a multiple of 3).
    """
    if weight.shape[1] == in_chans:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_chans // weight.shape[1])
    return weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (weight.shape[1] / in_chans)


def group_keys(keys: Iterable[str], limit: int = 12) -> List[str]:
    """Collapse block numbers so thousands of keys read as a few lines: ``blocks.*.attn.qkv.weight (12)``."""
    groups: "OrderedDict[str, int]" = OrderedDict()
    for key in keys:
        pattern = re.sub(r"\.\d+\.", ".*.", key)
        groups[pattern] = groups.get(pattern, 0) + 1
    lines = [f"{p} ({n})" if n > 1 else p for p, n in groups.items()]
    return lines[:limit] + ([f"... and {len(lines) - limit} more groups"] if len(lines) > limit else [])


def load_timm_checkpoint(vit: nn.Module, path: str) -> None:
    """Load ``path`` into ``vit``: classifier keys dropped, ``pos_embed`` resampled (bicubic) to the
    model's grid, patch embedding adapted to the model's input channels; everything else strict."""
    state = read_state_dict(path)
    own = vit.state_dict()
    state = {k: v for k, v in state.items() if not (k.startswith(_HEAD_PREFIXES) and k not in own)}
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], new_size=list(vit.patch_embed.grid_size), num_prefix_tokens=prefix
        )
    key = "patch_embed.proj.weight"
    if key in state and key in own and state[key].shape[1] != own[key].shape[1]:
        state[key] = adapt_patch_embed(state[key], own[key].shape[1])
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong_shape:
        parts = [f"checkpoint {path!r} does not match the backbone {type(vit).__name__} (timm layout)."]
        if missing:
            parts.append(f"Missing keys ({len(missing)}): " + "; ".join(group_keys(missing)))
        if unexpected:
            parts.append(f"Unexpected keys ({len(unexpected)}): " + "; ".join(group_keys(unexpected)))
        if wrong_shape:
            parts.append("Shape mismatches: " + "; ".join(wrong_shape[:8]))
        parts.append(
            "Likely cause: a different size preset (embed dim / depth) or a different model family "
            "than the file was trained with."
        )
        raise ValueError("\n".join(parts))
    vit.load_state_dict(state, strict=True)
    logger.info("loaded backbone weights from %s (%d tensors)", path, len(state))
