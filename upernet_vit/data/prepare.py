"""What a training run reads before its first step: the dataset, checked, split into the fold's cases,
with the intensity scale and the classes no training mask holds.

``prepare_data(cfg)`` is where every data error surfaces, each naming its file; the trainer only consumes
the :class:`PreparedData` it returns.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from ..config import DataConfig
from .datasets import Case, DatasetInfo, absent_classes, load_folders, load_nnunet_raw
from .volumes import channel_normalization, volume_of, volume_slices, warn_mixed_spacing
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
    normalization: str = "preset"  # data.normalization for images; "volume" for volumes (volumes.py)
    volumes: bool = False  # the cases are slices of volumes (VolumeSlice)
    channel_normalization: Optional[List[Dict[str, Any]]] = None  # volumes: each channel's rule


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
            info, cases = load_nnunet_raw(cfg.root, slice_axis=cfg.slice_axis, stacks=cfg.stacks)
        else:
            info, cases = load_folders(cfg.root, cfg.labels, slice_axis=cfg.slice_axis, stacks=cfg.stacks)
        splits_file = cfg.splits_file or os.path.join(cfg.root, "splits_final.json")
    if info.num_classes < 2:
        raise ValueError(f"the dataset has {info.num_classes} label(s); segmentation needs background plus at least one class")
    volumes = bool(cases) and cases[0].image.ndim == 4
    if cfg.context_slices and not volumes:
        raise ValueError(f"data.context_slices {cfg.context_slices} takes neighbouring slices of volumes, but "
                         f"{cfg.root or 'the demo'} holds 2-D images; set data.context_slices: 0, or data.stacks: "
                         f"true if its multi-page files are z-stacks")
    ranges = [c.pixel_range() for c in cases if c.image.size]
    fold = str(cfg.fold)
    train_ids, val_ids, splits = fold_case_ids(  # folds of whole volumes: a volume's slices stay together
        [c.case_id for c in cases], fold, splits_file, cfg.num_folds, required=bool(cfg.splits_file)
    )
    rules = None
    if volumes:
        logger.info("%d volumes, cut into 2-D slices (data.slice_axis %s, %d context slice(s) on each side)",
                    len(cases), cfg.slice_axis if cfg.slice_axis is not None else "null: the axis of largest spacing",
                    cfg.context_slices)
        warn_mixed_spacing(cases)
        training = set(train_ids)
        rules = channel_normalization(info, [c for c in cases if c.case_id in training])
        info.num_channels *= 2 * cfg.context_slices + 1
        cases = [s for c in cases for s in volume_slices(c, cfg.context_slices, info.num_classes, rules)]
        scale = 1.0  # normalized by the volumes' rules: no intensity scale
    else:
        scale = choose_intensity_scale({c.source or c.case_id: c.full_scale for c in cases}, cfg.normalization,
                                       cfg.intensity_scale)
    by_volume: Dict[str, List[Case]] = {}
    for c in cases:
        by_volume.setdefault(volume_of(c), []).append(c)
    train_cases = [c for i in train_ids for c in by_volume[i]]
    absent = absent_classes(info, train_cases)
    if absent:
        logger.warning(
            "class(es) %s are declared (%s) but no training mask of fold %s contains them: the model cannot "
            "learn them, and they are left out of the mean validation Dice",
            ", ".join(f"{info.label_names[i]!r} (value {info.label_values[i]})" for i in absent),
            "data.labels" if cfg.labels else ("dataset.json" if cfg.format == "nnunet" else "the dataset"), fold,
        )
    low, high = (min(r[0] for r in ranges), max(r[1] for r in ranges)) if ranges else (0.0, 0.0)
    return PreparedData(info, train_cases, [c for i in val_ids for c in by_volume[i]], splits, scale, [low, high],
                        absent, "volume" if volumes else cfg.normalization, volumes, rules)
