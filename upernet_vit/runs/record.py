"""The model's record, ``preprocessing.json``: what a trained model's inputs were (normalization, mean/std,
intensity scale and range), its label values and training patch size; predict and export read it."""
from __future__ import annotations

import os
from typing import Dict, Optional

from ..fileio import read_json
from ..pretrained import PREPROCESSING_NAME


def read_preprocessing(model_dir: str) -> Optional[Dict]:
    """A trained model folder's ``preprocessing.json`` (mean/std, normalization, intensity scale and range,
    label values, patch size); None for a bare ``save_pretrained`` folder. A record without the keys predict
    needs is a ValueError naming the file and the keys."""
    path = os.path.join(model_dir, PREPROCESSING_NAME)
    return check_preprocessing(read_json(path), path) if os.path.isfile(path) else None


def check_preprocessing(prep: object, path: str) -> Dict:
    """``prep`` (the record read from ``path``) if it holds every key predict needs, else a ValueError."""
    missing = [k for k in ("mean", "std", "normalization", "label_values", "patch_size", "intensity_scale",
                           "intensity_range") if not isinstance(prep, dict) or k not in prep]
    if missing:
        raise ValueError(
            f"{path} lacks {', '.join(missing)} (written by an older upernet-vit, or edited); predict needs them "
            f"to treat inputs as in training. Train the model again, or add them: intensity_scale is 255 for a "
            f"model trained on 8-bit images, intensity_range the [min, max] of its training pixel values"
        )
    return prep  # type: ignore[return-value]
