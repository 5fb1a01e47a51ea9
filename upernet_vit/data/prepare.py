"""What a training run reads before its first step: the dataset, checked, split into the fold's cases,
with the intensity scale and the classes no training mask holds.

``prepare_data(cfg)`` is where every data error surfaces, each naming its file; the trainer only consumes
the :class:`PreparedData` it returns.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

from ..config import DataConfig
from .datasets import Case, DatasetInfo, absent_classes, load_folders, load_nnunet_raw
from .demo import demo_cases, demo_info
from .splits import fold_case_ids
from .intensity import choose_intensity_scale

logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    info: DatasetInfo
    train_cases: List[Case]
    val_cases: List[Case]
    splits: List[Dict[str, List[str]]]
    intensity_scale: float  # pixel values / this -> [0, 1] for the preset normalization (data/intensity.py)
    intensity_range: List[float]  # [min, max] pixel value of the dataset's images
    absent: List[int]  # class indices that no training mask contains (left out of the mean Dice)


def prepare_data(cfg: DataConfig, cache_root: Optional[str] = None) -> PreparedData:
    """Load and check the dataset, pick the fold's cases and the intensity scale. A declared class that no
    training mask of the fold contains is a warning naming it. ``cache_root``: read the dataset through the
    data cache there (:mod:`.cache`: built once, memory-mapped); None: every case in memory. The demo's
    generated cases stay in memory (64 small images)."""
    if cfg.format == "demo":  # the same images whatever train.seed is
        info, cases = demo_info(), demo_cases(cfg.demo_cases, cfg.demo_image_size)
        splits_file = None
    else:
        if not cfg.root:
            raise ValueError(f"data.root is not set: data.format {cfg.format!r} needs the dataset folder")
        if cache_root is not None:
            from .cache import cached_dataset

            info, cases = cached_dataset(cfg, cache_root)
        elif cfg.format == "nnunet":
            info, cases = load_nnunet_raw(cfg.root)
        else:
            info, cases = load_folders(cfg.root, cfg.labels)
        splits_file = cfg.splits_file or os.path.join(cfg.root, "splits_final.json")
    if info.num_classes < 2:
        raise ValueError(f"the dataset has {info.num_classes} label(s); segmentation needs background plus at least one class")
    fold = str(cfg.fold)
    train_ids, val_ids, splits = fold_case_ids(
        [c.case_id for c in cases], fold, splits_file, cfg.num_folds, required=bool(cfg.splits_file)
    )
    by_id = {c.case_id: c for c in cases}
    train_cases = [by_id[i] for i in train_ids]
    scale = choose_intensity_scale({c.source or c.case_id: c.full_scale for c in cases}, cfg.normalization,
                                   cfg.intensity_scale)
    absent = absent_classes(info, train_cases)
    if absent:
        logger.warning(
            "class(es) %s are declared (%s) but no training mask of fold %s contains them: the model cannot "
            "learn them, and they are left out of the mean validation Dice",
            ", ".join(f"{info.label_names[i]!r} (value {info.label_values[i]})" for i in absent),
            "data.labels" if cfg.labels else ("dataset.json" if cfg.format == "nnunet" else "the dataset"), fold,
        )
    ranges = [c.pixel_range() for c in cases if c.image.size]
    low, high = (min(r[0] for r in ranges), max(r[1] for r in ranges)) if ranges else (0.0, 0.0)
    return PreparedData(info, train_cases, [by_id[i] for i in val_ids], splits, scale, [low, high], absent)
