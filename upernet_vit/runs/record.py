"""The model's record, ``preprocessing.json``: what a trained model's inputs were and what its outputs mean.

    version          RECORD_VERSION; a record without it is version 1 (written before the field existed)
    normalization    "preset" (the backbone's mean/std) or "zscore" (per image)
    mean, std        per channel, for images scaled to [0, 1]
    intensity_scale  stored pixel values are divided by it (1, 255, 65535, ...)
    intensity_range  [min, max] of the training pixel values (predict holds inputs against it)
    label_values     the value written for each class index 0..K-1
    patch_size       the training patch [h, w] (the sliding window); null: whole-image inference
    label_names, num_channels, file_ending: the dataset's, for the user (optional)

:class:`ModelRecord` is the one reader and writer of its fields: the trainer makes one, predict and export
read one. The model keeps it as a plain JSON mapping (``model.preprocessing``), which ``save_pretrained``
and ``from_pretrained`` store beside the weights without reading it: the model core never depends on the
run's record.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from ..fileio import read_json
from ..pretrained import PREPROCESSING_NAME

RECORD_VERSION = 2
REQUIRED = ("mean", "std", "normalization", "label_values", "patch_size", "intensity_scale", "intensity_range")


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
        if not isinstance(version, int) or version > RECORD_VERSION:
            raise ValueError(f"{path} is a version {version} record, written by a newer upernet-vit (this one reads "
                             f"up to version {RECORD_VERSION}); upgrade: pip install -U upernet-vit")
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise ValueError(
                f"{path} lacks {', '.join(missing)} (written by an older upernet-vit, or edited); predict needs "
                f"them to treat inputs as in training. Train the model again, or add them: intensity_scale is 255 "
                f"for a model trained on 8-bit images, intensity_range the [min, max] of its training pixel values"
            )
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
