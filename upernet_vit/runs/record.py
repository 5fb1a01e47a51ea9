"""The model's record, ``preprocessing.json``: what a trained model's inputs were and what its outputs mean.

    version          RECORD_VERSION; a record without it is version 1 (written before the field existed)
    normalization    "preset" (the backbone's mean/std), "zscore" (per image) or "volume" (per volume)
    mean, std        per channel, for images scaled to [0, 1]
    intensity_scale  stored pixel values are divided by it (1, 255, 65535, ...)
    intensity_range  [min, max] of the training pixel values (predict holds inputs against it)
    label_values     the value written for each class index 0..K-1
    patch_size       the training patch [h, w] (the sliding window); null: whole-image inference
    label_names, num_channels, file_ending: the dataset's, for the user (optional)
    slice_axis       volumes: the axis slices are taken along (null: the axis of largest spacing)
    context_slices   volumes: k neighbours on each side as extra channels (2.5-D); 0: none
    channel_normalization  volumes: each channel's rule, {scheme: zscore} (per volume) or {scheme: ct,
                     clip: [lo, hi], mean, std} (the training set's foreground statistics)

:class:`ModelRecord` is the one reader and writer of its fields: the trainer makes one, predict and export
read one. The model keeps it as a plain JSON mapping (``model.preprocessing``), which ``save_pretrained``
and ``from_pretrained`` store beside the weights without reading it: the model core never depends on the
run's record.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..fileio import read_json
from ..pretrained import PREPROCESSING_NAME

RECORD_VERSION = 2
REQUIRED = ("mean", "std", "normalization", "label_values", "patch_size", "intensity_scale", "intensity_range")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _numbers(count: Optional[int] = None) -> Callable[[object], bool]:
    return lambda v: isinstance(v, list) and bool(v) and all(_is_number(x) for x in v) and (count is None or len(v) == count)


# what each field must hold, and how to say it
_FIELD_CHECKS: Dict[str, Tuple[Callable[[object], bool], str]] = {
    "mean": (_numbers(), "a list of numbers, one per channel"),
    "std": (lambda v: _numbers()(v) and all(x > 0 for x in v), "a list of positive numbers, one per channel"),
    "normalization": (lambda v: v in ("preset", "zscore", "volume"), "'preset', 'zscore' or 'volume'"),
    "label_values": (lambda v: isinstance(v, list) and bool(v) and all(_is_int(x) for x in v),
                     "a list of integers, one per class"),
    "patch_size": (lambda v: v is None or (isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v)),
                   "null or [height, width] in pixels"),
    "intensity_scale": (lambda v: _is_number(v) and v > 0, "a positive number (e.g. 255 for 8-bit images)"),
    "intensity_range": (_numbers(2), "[min, max] of the training pixel values"),
    "label_names": (lambda v: v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
                    "null or a list of class names"),
    "num_channels": (lambda v: v is None or (_is_int(v) and v > 0), "null or a positive integer"),
    "file_ending": (lambda v: v is None or isinstance(v, str), "null or a file ending such as '.png'"),
    "slice_axis": (lambda v: v is None or v in (0, 1, 2) and _is_int(v), "null, 0, 1 or 2"),
    "context_slices": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "channel_normalization": (lambda v: v is None or (isinstance(v, list) and all(_is_rule(r) for r in v)),
                              "null or one rule per channel: {scheme: zscore} or {scheme: ct, clip, mean, std}"),
}


def _is_rule(rule: object) -> bool:
    """A channel's normalization rule (data/volumes.py)."""
    if not isinstance(rule, dict):
        return False
    if rule.get("scheme") == "zscore":
        return True
    return (rule.get("scheme") == "ct" and _numbers(2)(rule.get("clip")) and _is_number(rule.get("mean"))
            and _is_number(rule.get("std")) and rule["std"] > 0)


@dataclass(frozen=True)
class ModelRecord:
    """A trained model's record (module docstring)."""

    mean: List[float]
    std: List[float]
    normalization: str
    label_values: List[int]
    patch_size: Optional[List[int]]
    intensity_scale: float
    intensity_range: List[float]
    label_names: Optional[List[str]] = None
    num_channels: Optional[int] = None
    file_ending: Optional[str] = None
    slice_axis: Optional[int] = None
    context_slices: int = 0
    channel_normalization: Optional[List[Dict[str, Any]]] = None
    version: int = RECORD_VERSION

    def to_json(self) -> Dict[str, Any]:
        """The mapping ``preprocessing.json`` holds (``model.preprocessing``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: object, path: str) -> "ModelRecord":
        """The record in ``data`` (read from ``path``, named in errors). Version 1 records (no ``version``)
        load; a record missing a key predict needs, or of a newer version, is a ValueError."""
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a JSON object (a damaged or foreign file); train the model again")
        version = data.get("version", 1)
        if not _is_int(version) or version < 1:
            raise ValueError(f"{path}: version {version!r} is not a record version (1, 2, ...); the file was edited "
                             f"or is not a model record")
        if version > RECORD_VERSION:
            raise ValueError(f"{path} is a version {version} record, written by a newer upernet-vit (this one reads "
                             f"up to version {RECORD_VERSION}); upgrade: pip install -U upernet-vit")
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise ValueError(
                f"{path} lacks {', '.join(missing)} (written by an older upernet-vit, or edited); predict needs "
                f"them to treat inputs as in training. Train the model again, or add them: intensity_scale is 255 "
                f"for a model trained on 8-bit images, intensity_range the [min, max] of its training pixel values"
            )
        for key, (ok, must) in _FIELD_CHECKS.items():
            if key in data and not ok(data[key]):
                raise ValueError(f"{path}: {key} is {data[key]!r}, but must be {must} (the file was edited); "
                                 f"restore it, or train the model again")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        return cls(**{**values, "version": RECORD_VERSION})  # read once, held in the current form

    @classmethod
    def for_untrained(cls, mean: List[float], std: List[float], num_classes: int,
                      intensity_scale: float) -> "ModelRecord":
        """What a model folder without a record is taken to mean when the caller gives ``intensity_scale``:
        inputs / scale, then the backbone's mean/std, labels 0..K-1, whole-image inference."""
        return cls(list(mean), list(std), "preset", list(range(num_classes)), None, float(intensity_scale),
                   [0.0, float(intensity_scale)])


def read_record(model_dir: str) -> Optional[ModelRecord]:
    """A model folder's record; None for a bare ``save_pretrained`` folder (no ``preprocessing.json``)."""
    path = os.path.join(model_dir, PREPROCESSING_NAME)
    return ModelRecord.from_json(read_json(path), path) if os.path.isfile(path) else None
