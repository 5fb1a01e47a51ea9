"""``save_pretrained`` / ``from_pretrained``: a model folder is ``model.safetensors`` (the weights),
``model.safetensors.sha256`` (its checksum, ``sha256sum -c`` format: safetensors has none of its own),
``config.yaml`` (the ``model`` and ``lora`` sections that rebuild the architecture) and, for a trained
model, ``preprocessing.json`` (``model.preprocessing``: what the model was trained on; predict reads it)."""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import TYPE_CHECKING, List, Mapping, Optional, Type, TypeVar, Union

import torch

from .backbones.meta import build_on_meta, check_materialized
from .config import config_to_yaml, load_config
from .fileio import atomic_write, read_json, write_text

if TYPE_CHECKING:
    from .model import UperNetViT

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
CHECKSUM_NAME = WEIGHTS_NAME + ".sha256"
PREPROCESSING_NAME = "preprocessing.json"

M = TypeVar("M", bound="UperNetViT")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def non_finite_tensors(state: Mapping[str, torch.Tensor]) -> List[str]:
    """Names of the floating tensors in ``state`` that hold NaN or infinity."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save_pretrained(model: "UperNetViT", directory: Union[str, os.PathLike],
                    state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """Write ``model.safetensors``, its ``.sha256``, ``config.yaml`` and, when the model has a record of its
    training data (``model.preprocessing``), ``preprocessing.json`` (each atomically) into ``directory``.
    ``state_dict``: the weights to write instead of ``model.state_dict()`` (a sharded model's, gathered:
    ``training/fsdp.py``). Non-finite weights are refused (a ValueError naming a tensor): such a model
    predicts nothing."""
    from safetensors.torch import save_file

    directory = os.fspath(directory)
    text = config_to_yaml(model.to_config(), ("model", "lora"))  # before any file changes
    weights = model.state_dict() if state_dict is None else state_dict
    state = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    bad = non_finite_tensors(state)
    if bad:
        raise ValueError(f"save_pretrained: {len(bad)} weight tensor(s) hold NaN or infinity (e.g. {bad[0]}); not saved")
    os.makedirs(directory, exist_ok=True)
    weights = os.path.join(directory, WEIGHTS_NAME)

    def write_weights(tmp: str) -> None:
        save_file(state, tmp, metadata={"format": "pt"})
        checksum[0] = file_sha256(tmp)  # of the bytes on disk, before the rename

    checksum = [""]
    sidecar = os.path.join(directory, CHECKSUM_NAME)
    if os.path.exists(sidecar):  # a crash before the new one is written must not leave the old one behind
        os.remove(sidecar)
    atomic_write(weights, write_weights)
    atomic_write(sidecar, lambda p: write_text(p, f"{checksum[0]}  {WEIGHTS_NAME}\n"))
    atomic_write(os.path.join(directory, CONFIG_NAME), lambda p: write_text(p, text))
    if model.preprocessing is not None:
        record = json.dumps(model.preprocessing, indent=1)
        atomic_write(os.path.join(directory, PREPROCESSING_NAME), lambda p: write_text(p, record))


def verify_checksum(directory: str) -> None:
    """Compare ``model.safetensors`` with its recorded sha256; folders saved before checksums existed pass."""
    path = os.path.join(directory, CHECKSUM_NAME)
    if not os.path.isfile(path):
        return
    with open(path, "rb") as f:
        recorded = f.read(4096).split()[:1]
    if not recorded or not re.fullmatch(rb"[0-9a-fA-F]{64}", recorded[0]):
        raise ValueError(
            f"{path} is damaged: it should hold the sha256 of {WEIGHTS_NAME} (64 hex digits) but holds "
            f"{'nothing' if not recorded else repr(recorded[0][:40])}. Restore the folder "
            f"from a copy, or delete {CHECKSUM_NAME} to load {WEIGHTS_NAME} unchecked"
        )
    actual = file_sha256(os.path.join(directory, WEIGHTS_NAME))
    if recorded[0].decode("ascii").lower() != actual:
        raise ValueError(
            f"{os.path.join(directory, WEIGHTS_NAME)} is damaged or was changed after it was saved: its sha256 is "
            f"{actual} but {path} records {recorded[0].decode('ascii')}. Restore the folder from a "
            f"copy (or, if you changed the weights on purpose, delete {CHECKSUM_NAME})"
        )


def from_pretrained(cls: Type[M], directory: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> M:
    """Rebuild a model written by :func:`save_pretrained`, on ``device``, after checking the weights'
    sha256. The backbone's original ``checkpoint_path`` (or ``pretrained`` weights) is not read again (the weights come from
    ``model.safetensors``). A damaged file or a ``config.yaml`` that does not describe the weights is a
    ValueError naming the files."""
    from safetensors.torch import load_file

    directory = os.fspath(directory)
    weights, config_path = os.path.join(directory, WEIGHTS_NAME), os.path.join(directory, CONFIG_NAME)
    for path in (weights, config_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found; from_pretrained needs a folder written by save_pretrained()")
    verify_checksum(directory)
    cfg = load_config(config_path)
    original = cfg.model.checkpoint_path, cfg.model.pretrained
    cfg.model.checkpoint_path, cfg.model.pretrained = None, False  # the weights come from model.safetensors
    try:
        state = load_file(weights)  # memory-mapped
    except Exception as err:  # safetensors raises its own error type
        raise ValueError(f"cannot read {weights}: {err}; the file is damaged or truncated") from err
    with build_on_meta():  # no random init, no second copy: the file's tensors become the weights
        model = cls.from_config(cfg)
        model.config.checkpoint_path, model.config.pretrained = original
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            shapes = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
            raise ValueError(
                f"{weights} does not match {config_path}: {'; '.join(shapes[:5]) or err}. The config.yaml was "
                f"edited or comes from another model; restore the pair saved together"
            ) from err
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{weights} does not match {config_path}: missing {result.missing_keys[:10]}, "
            f"unexpected {result.unexpected_keys[:10]}"
        )
    check_materialized(model, weights)
    record = os.path.join(directory, PREPROCESSING_NAME)
    if os.path.isfile(record):
        model.preprocessing = read_json(record)
    return model.to(device)
