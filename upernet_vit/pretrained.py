"""``save_pretrained`` / ``from_pretrained``: a model folder is ``model.safetensors`` (the weights),
``config.yaml`` (the ``model`` and ``lora`` sections that rebuild the architecture), for a trained model
``preprocessing.json`` (``model.preprocessing``: what the model was trained on; predict reads it), and
``SHA256SUMS``, the digest of each of them (``sha256sum -c`` format), written last.

The folder is checked whole before it is used: an edited ``config.yaml`` (``num_heads: 2`` -> ``4`` keeps
every shape and changes every output) is refused as surely as damaged weights, naming the file. An edit
made on purpose is accepted by :func:`accept_edits`, which checks that the folder still loads and records
the new digests. Folders from before ``SHA256SUMS`` carry ``model.safetensors.sha256`` (the weights only),
which is still checked, or nothing, and load."""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Type, TypeVar, Union

import torch

from .backbones.meta import build_on_meta, check_materialized
from .config import config_to_yaml, load_config, read_yaml
from .precision import FULL, SPELLINGS
from .fileio import atomic_write, read_json, write_text

if TYPE_CHECKING:
    from .model import UperNetViT

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
CHECKSUMS_NAME = "SHA256SUMS"
LEGACY_CHECKSUM_NAME = WEIGHTS_NAME + ".sha256"  # before SHA256SUMS: the weights' digest alone
PREPROCESSING_NAME = "preprocessing.json"
CHECKED_NAMES = (WEIGHTS_NAME, CONFIG_NAME, PREPROCESSING_NAME)  # what SHA256SUMS covers, when present

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
    """Write ``model.safetensors``, ``config.yaml``, when the model has a record of its training data
    (``model.preprocessing``) ``preprocessing.json``, and last ``SHA256SUMS`` (each atomically) into
    ``directory``; a ``preprocessing.json`` of an earlier save is removed when the model has none.
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
        digests[WEIGHTS_NAME] = file_sha256(tmp)  # of the bytes on disk, before the rename

    digests: Dict[str, str] = {}
    for stale in (CHECKSUMS_NAME, LEGACY_CHECKSUM_NAME):  # a crash before the new sums are written must not leave old ones
        if os.path.exists(os.path.join(directory, stale)):
            os.remove(os.path.join(directory, stale))
    atomic_write(weights, write_weights)
    texts = {CONFIG_NAME: text}
    if model.preprocessing is not None:
        texts[PREPROCESSING_NAME] = json.dumps(model.preprocessing, indent=1)
    elif os.path.exists(os.path.join(directory, PREPROCESSING_NAME)):
        os.remove(os.path.join(directory, PREPROCESSING_NAME))  # another model's record would pass for this one's
    for name, content in texts.items():
        atomic_write(os.path.join(directory, name), lambda p, c=content: write_text(p, c))
        digests[name] = hashlib.sha256(content.encode("utf-8")).hexdigest()
    _write_sums(directory, digests)


def _write_sums(directory: str, digests: Mapping[str, str]) -> None:
    text = "".join(f"{digests[n]}  {n}\n" for n in CHECKED_NAMES if n in digests)
    atomic_write(os.path.join(directory, CHECKSUMS_NAME), lambda p: write_text(p, text))


def _read_sums(path: str) -> Dict[str, str]:
    """``{file name: sha256}`` of a ``SHA256SUMS`` or ``.sha256`` file; a ValueError when it is damaged."""
    with open(path, "rb") as f:
        lines = [line.split() for line in f.read(1 << 16).splitlines() if line.strip()]
    sums = {}
    for fields in lines:
        if len(fields) != 2 or not re.fullmatch(rb"[0-9a-fA-F]{64}", fields[0]):
            break
        sums[fields[1].lstrip(b"*").decode("utf-8", "replace")] = fields[0].decode("ascii").lower()
    else:
        if sums:
            return sums
    shown = "nothing" if not lines else repr(lines[0][0][:40])
    raise ValueError(
        f"{path} is damaged: it should hold the sha256 of {WEIGHTS_NAME} (64 hex digits) but holds {shown}. "
        f"Restore the folder from a copy, or delete {os.path.basename(path)} to load {WEIGHTS_NAME} unchecked"
    )


def recorded_digests(directory: str) -> Dict[str, str]:
    """``{file name: sha256}`` as the folder records them (``SHA256SUMS``, else the older
    ``model.safetensors.sha256``); empty for a folder saved before checksums existed."""
    for name in (CHECKSUMS_NAME, LEGACY_CHECKSUM_NAME):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return _read_sums(path)
    return {}


def verify_checksum(directory: str) -> None:
    """Hold every file of the model folder against its recorded sha256 (:func:`recorded_digests`): a
    changed, missing or unrecorded ``model.safetensors``, ``config.yaml`` or ``preprocessing.json`` is a
    ValueError naming it. Folders saved before checksums existed pass."""
    recorded = recorded_digests(directory)
    if not recorded:
        return
    whole = os.path.isfile(os.path.join(directory, CHECKSUMS_NAME))
    accept = f"accept the edit: upernet-vit accept-edits {directory} (in Python upernet_vit.pretrained.accept_edits)"
    for name in CHECKED_NAMES if whole else (WEIGHTS_NAME,):
        path = os.path.join(directory, name)
        if name not in recorded:
            if os.path.isfile(path):
                raise ValueError(f"{path} was added after the model was saved ({CHECKSUMS_NAME} does not list "
                                 f"it): remove it, or, if you added it on purpose, {accept}")
            continue
        if not os.path.isfile(path):
            raise ValueError(f"{path} is missing, but {os.path.join(directory, CHECKSUMS_NAME)} lists it: restore "
                             f"the folder from a copy, or, if you removed it on purpose, {accept}")
        actual = file_sha256(path)
        if actual != recorded[name]:
            raise ValueError(
                f"{path} is damaged or was changed after it was saved: its sha256 is {actual} but "
                f"{os.path.join(directory, CHECKSUMS_NAME if whole else LEGACY_CHECKSUM_NAME)} records {recorded[name]}. "
                f"Restore the folder from a copy, or, if you changed it on purpose, {accept}"
            )


def accept_edits(directory: Union[str, os.PathLike]) -> List[str]:
    """Record the model folder's files as they are now (``SHA256SUMS``), after checking that they still
    load together (``config.yaml`` describes the weights); the names of the files edited, removed or added
    since the record (in a folder from before ``SHA256SUMS``, only the weights had a record). For a
    deliberate edit, e.g. of ``preprocessing.json``'s label names; a damaged folder still fails to load."""
    from .model import UperNetViT

    directory = os.fspath(directory)
    before = recorded_digests(directory)
    checked = CHECKED_NAMES if os.path.isfile(os.path.join(directory, CHECKSUMS_NAME)) else tuple(before)
    from_pretrained(UperNetViT, directory, verify=False)
    now = {n: file_sha256(os.path.join(directory, n)) for n in CHECKED_NAMES
           if os.path.isfile(os.path.join(directory, n))}
    _write_sums(directory, now)
    legacy = os.path.join(directory, LEGACY_CHECKSUM_NAME)
    if os.path.exists(legacy):
        os.remove(legacy)
    return sorted(n for n in set(before) | set(now) if n in checked and before.get(n) != now.get(n))


def _frozen_if_stored_half(data: object) -> object:
    """A saved config whose backbone is stored below float32 without LoRA and not marked frozen (written
    before the precision rule, e.g. after ``merge_lora``) marked ``freeze_backbone: true``: that backbone
    was frozen then too, and says so now, as the rule asks."""
    model = data.get("model") if isinstance(data, dict) else None
    lora = data.get("lora") if isinstance(data, dict) else None
    if (isinstance(model, dict) and SPELLINGS.get(str(model.get("backbone_dtype", FULL))) not in (FULL, None)
            and not model.get("freeze_backbone") and not (isinstance(lora, dict) and lora.get("enabled"))):
        model["freeze_backbone"] = True
    return data


def from_pretrained(cls: Type[M], directory: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
                    verify: bool = True) -> M:
    """Rebuild a model written by :func:`save_pretrained`, on ``device``, after checking the folder's files
    against ``SHA256SUMS`` (:func:`verify_checksum`; ``verify=False`` skips it). The backbone's original ``checkpoint_path`` (or ``pretrained`` weights) is not read again (the weights come from
    ``model.safetensors``). A damaged file or a ``config.yaml`` that does not describe the weights is a
    ValueError naming the files."""
    from safetensors.torch import load_file

    directory = os.fspath(directory)
    weights, config_path = os.path.join(directory, WEIGHTS_NAME), os.path.join(directory, CONFIG_NAME)
    for path in (weights, config_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found; from_pretrained needs a folder written by save_pretrained()")
    if verify:
        verify_checksum(directory)
    cfg = load_config(_frozen_if_stored_half(read_yaml(config_path)), origin=config_path)
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
