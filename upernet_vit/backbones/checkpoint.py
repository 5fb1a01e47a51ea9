"""Load a local backbone checkpoint into a timm ViT: official layouts converted, strictly checked.

Formats (``checkpoint_format``, ``"auto"`` detects them from the keys): timm state dicts and
``.safetensors``; DINOv2 hub and training files; DINOv3 hub files; RETFound MAE; RETFound DINOv2;
VisionFM. See :mod:`upernet_vit.backbones.official`.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import pickle
import re
from collections import OrderedDict
from typing import Any, Iterable, List, Optional

import torch
from torch import nn

from .official import to_timm
from .pos_embed import resample_patch_pos_embed

logger = logging.getLogger(__name__)


def _file_kind(head: bytes) -> str:
    """``torch`` (zip or legacy pickle), ``safetensors``, ``empty`` or ``unknown``, from a file's first bytes."""
    if not head:
        return "empty"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save's zip, or a legacy pickle
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":  # 8-byte little-endian header size, then the JSON header
        return "safetensors"
    return "unknown"


def read_checkpoint(path: str, trust_checkpoint: bool = False, mmap: bool = False) -> Any:
    """The object stored in ``path``. Torch files load with ``weights_only=True`` (tensors, containers
    and ``argparse.Namespace``, which MAE-style trainers save as ``args``); a file that stores other
    Python objects needs ``trust_checkpoint=True``, because full unpickling can run code from the file.
    A file that is no checkpoint at all (empty, text, truncated) is a ValueError saying so. ``mmap``: a torch
    zip file's tensors are memory-mapped (read when used, so a large file is never held in memory twice; a
    file system that cannot map files falls back to reading); safetensors files are always mapped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint_path {path!r} does not exist or is not a file")
    with open(path, "rb") as f:
        head = f.read(16)
    kind = _file_kind(head)
    if kind == "empty":
        raise ValueError(f"checkpoint_path {path!r} is an empty file, not a checkpoint (an interrupted download?)")
    if kind == "unknown":
        raise ValueError(
            f"checkpoint_path {path!r} is not a PyTorch or safetensors checkpoint (it starts with {head!r}); "
            f"give the .pth/.pt/.safetensors weights file itself"
        )
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as err:  # safetensors raises its own error type
            raise ValueError(f"checkpoint_path {path!r} is a damaged safetensors file: {first_line(err)}") from err
    if _is_zip_without_pickle(path):
        raise ValueError(
            f"checkpoint_path {path!r} is a zip archive but not a PyTorch checkpoint (no data.pkl inside; an .npz "
            f"or a zipped folder?); give the .pth/.pt/.safetensors weights file itself"
        )
    try:
        if mmap and head[:4] == b"PK\x03\x04":  # the zip format only: a legacy pickle is read whole
            try:
                return _torch_load(path, trust_checkpoint, mmap=True)
            except Exception:  # e.g. a mount that cannot map files: read it instead (a damaged file fails again)
                pass
        return _torch_load(path, trust_checkpoint, mmap=False)
    except Exception as err:  # pickle and zip errors come in several types
        if "Unsupported global" in str(err):  # torch's weights-only unpickler refused a Python object
            raise ValueError(
                f"could not read {path!r} as a weights-only torch checkpoint: it stores Python objects beyond "
                f"tensors ({first_line(err, 'Unsupported global')}). If you trust this file, pass "
                f"trust_checkpoint=True (YAML: model.trust_checkpoint: true) to unpickle it fully; that can "
                f"run code stored in the file"
            ) from err
        if isinstance(err, (EOFError, pickle.UnpicklingError)) or (
            isinstance(err, RuntimeError) and any(s in str(err) for s in ("zip archive", "unexpected EOF", "corrupted"))
        ):
            raise ValueError(
                f"checkpoint_path {path!r} is a damaged or truncated torch checkpoint ({type(err).__name__}: "
                f"{first_line(err)}); download or copy it again"
            ) from err
        raise ValueError(  # e.g. a class that full unpickling needs but cannot import
            f"could not read checkpoint_path {path!r}: {type(err).__name__}: {first_line(err)}"
        ) from err


def _torch_load(path: str, trust_checkpoint: bool, mmap: bool) -> Any:
    if trust_checkpoint:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _is_zip_without_pickle(path: str) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return not any(name.endswith("data.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):  # not a zip (legacy torch pickle) or a damaged one: torch.load tells
        return False


def first_line(err: BaseException, containing: str = "") -> str:
    """The first non-empty line of ``err``'s message (the first one with ``containing``, if given)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    picked = [line for line in lines if containing in line] if containing else lines
    return (picked or lines or [type(err).__name__])[0]


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


def _fit_pos_embed(file_pos: torch.Tensor, own_pos: torch.Tensor, mode: str) -> torch.Tensor:
    """Resample the file's ``pos_embed`` to the model's grid by the family's rule (once, at load)."""
    n_prefix = own_pos.shape[1] - int(math.isqrt(own_pos.shape[1])) ** 2
    own_grid = int(math.isqrt(own_pos.shape[1] - n_prefix))
    resampled = resample_patch_pos_embed(file_pos[:, n_prefix:], (own_grid, own_grid), mode)
    return torch.cat([file_pos[:, :n_prefix], resampled], dim=1)


def _arch(vit: nn.Module) -> str:
    return str(getattr(vit, "pretrained_cfg", {}).get("architecture") or type(vit).__name__)


def load_backbone_checkpoint(
    vit: nn.Module,
    path: str,
    checkpoint_format: str = "auto",
    trust_checkpoint: bool = False,
    pos_embed_interpolation: str = "timm",
    expected_format: Optional[str] = None,
) -> str:
    """Load ``path`` into ``vit`` strictly; returns the format it was read as.

    Heads, MAE decoders and masking tokens are dropped; a ``pos_embed`` for another grid is resampled
    by the family's rule; the patch embedding is adapted to the model's input channels; DINOv3's RoPE
    periods are taken from the file. Any other mismatch is an error that names the format, the missing
    and unexpected keys (grouped) and the likely cause.
    """
    state, fmt, extras = to_timm(read_checkpoint(path, trust_checkpoint, mmap=True), vit, checkpoint_format)
    own = vit.state_dict()
    if "rope.periods" in own:
        # the file's periods are bf16-rounded; recomputing them in fp32 would shift every RoPE angle
        state["rope.periods"] = extras.get("rope_periods", own["rope.periods"]).to(own["rope.periods"].dtype)
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        state["pos_embed"] = _fit_pos_embed(state["pos_embed"], own["pos_embed"], pos_embed_interpolation)
        logger.info("resampled pos_embed of %s to the model's grid", path)
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
        expected = f" (this backbone expects '{expected_format}' files)" if expected_format and expected_format != fmt else ""
        parts = [f"checkpoint {path!r}, read as format '{fmt}'{expected}, does not match the backbone {_arch(vit)}."]
        if missing:
            parts.append(f"Missing keys ({len(missing)}): " + "; ".join(group_keys(missing)))
        if unexpected:
            parts.append(f"Unexpected keys ({len(unexpected)}): " + "; ".join(group_keys(unexpected)))
        if wrong_shape:
            parts.append("Shape mismatches: " + "; ".join(wrong_shape[:8]))
        parts.append(
            "Likely cause: a different size preset (embed dim / depth) or a different model family than the "
            "file was trained with; checkpoint_format can override the detected format."
        )
        raise ValueError("\n".join(parts))
    vit.load_state_dict(state, strict=True)
    logger.info("loaded backbone weights from %s (format %s, %d tensors)", path, fmt, len(state))
    return fmt
