"""``save_pretrained`` / ``from_pretrained``: a model folder is ``model.safetensors`` (the weights) plus
``config.yaml`` (the ``model`` and ``lora`` sections that rebuild the architecture)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Type, TypeVar, Union

import torch

from .config import config_to_yaml, load_config
from .fileio import atomic_write, write_text

if TYPE_CHECKING:
    from .model import UperNetViT

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"

M = TypeVar("M", bound="UperNetViT")


def save_pretrained(model: "UperNetViT", directory: Union[str, os.PathLike]) -> None:
    """Write ``model.safetensors`` and ``config.yaml`` (each atomically) into ``directory``."""
    from safetensors.torch import save_file

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    text = config_to_yaml(model.to_config(), ("model", "lora"))  # before any file changes
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda p: save_file(state, p, metadata={"format": "pt"}))
    atomic_write(os.path.join(directory, CONFIG_NAME), lambda p: write_text(p, text))


def from_pretrained(cls: Type[M], directory: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> M:
    """Rebuild a model written by :func:`save_pretrained`, on ``device``. The backbone's original
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
    result = model.load_state_dict(load_file(weights), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{weights} does not match {config_path}: missing {result.missing_keys[:10]}, "
            f"unexpected {result.unexpected_keys[:10]}"
        )
    return model.to(device)
