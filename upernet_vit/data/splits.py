"""Cross-validation folds: nnU-Net's 5-fold split over sorted case ids, or its ``splits_final.json``."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..fileio import read_json


def crossval_splits(case_ids: Sequence[str], n_splits: int = 5, seed: int = 12345) -> List[Dict[str, List[str]]]:
    """nnU-Net's ``generate_crossval_split``: sklearn ``KFold(n_splits, shuffle=True, random_state=seed)``
    over the sorted case ids, reproduced with numpy so the folds equal nnU-Net's ``splits_final.json``."""
    ids = sorted(case_ids)
    if len(ids) < n_splits:
        raise ValueError(f"{len(ids)} cases cannot be split into {n_splits} folds; use fold 'all' or more cases")
    order = np.arange(len(ids))
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(n_splits, len(ids) // n_splits)
    sizes[: len(ids) % n_splits] += 1
    splits, start = [], 0
    for size in sizes:
        val_idx = order[start : start + size]
        start += size
        val = set(val_idx.tolist())
        splits.append({  # both in index order, as sklearn returns them
            "train": [ids[i] for i in range(len(ids)) if i not in val],
            "val": [ids[i] for i in sorted(val)],
        })
    return splits


def fold_case_ids(
    case_ids: Sequence[str], fold: str, splits_file: Optional[str] = None, n_splits: int = 5, required: bool = False
) -> Tuple[List[str], List[str], List[Dict[str, List[str]]]]:
    """(train ids, val ids, all splits) for ``fold`` (``"0"``..``"4"`` or ``"all"``: train and validate on all).

    ``splits_file`` (nnU-Net's ``splits_final.json``) is used when it exists, else folds are generated;
    with ``required=True`` (the user named the file) a missing file is an error.
    """
    if splits_file and required and not os.path.isfile(splits_file):
        raise FileNotFoundError(f"data.splits_file {splits_file!r} does not exist")
    if splits_file and os.path.isfile(splits_file):
        splits = read_json(splits_file)
        if not isinstance(splits, list) or not all(isinstance(s, dict) and {"train", "val"} <= set(s) for s in splits):
            raise ValueError(f"{splits_file} must be a JSON list of {{\"train\": [...], \"val\": [...]}} folds (nnU-Net's splits_final.json)")
        known = set(case_ids)
        unknown = sorted({c for s in splits for part in ("train", "val") for c in s[part]} - known)
        if unknown:
            raise ValueError(f"{splits_file} names cases that are not in the dataset: {unknown[:5]}")
    else:
        splits = crossval_splits(case_ids, n_splits) if fold != "all" else []
    if fold == "all":
        return sorted(case_ids), sorted(case_ids), splits
    index = int(fold)
    if not 0 <= index < len(splits):
        raise ValueError(f"data.fold {fold!r} is out of range: there are {len(splits)} folds (0..{len(splits) - 1}) or 'all'")
    train, val = list(splits[index]["train"]), list(splits[index]["val"])
    where = splits_file if splits_file and os.path.isfile(splits_file) else "the generated splits"
    if not train or not val:
        raise ValueError(f"fold {index} of {where} has {len(train)} training and {len(val)} validation cases; both need at least one")
    overlap = sorted(set(train) & set(val))
    if overlap:
        raise ValueError(f"fold {index} of {where} has cases in both train and val: {overlap[:5]}")
    return train, val, splits
