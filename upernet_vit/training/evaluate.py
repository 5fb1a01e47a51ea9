"""``evaluate``: Dice and IoU of predicted label maps against ground truth, pooled over cases and as the
mean over cases (nnU-Net's ``summary.json`` convention). Reads label files only; writes nothing."""
from __future__ import annotations

import os
from typing import Dict, Optional

import numpy as np
import torch

from .data import IGNORE_INDEX
from .image_io import IMAGE_SUFFIXES, read_label
from .metrics import confusion_counts, dice_iou


def evaluate(
    pred_dir: str, gt_dir: str, labels: Optional[Dict[str, int]] = None, ignore_value: Optional[int] = None
) -> Dict:
    """Per-class Dice and IoU, two ways: ``dice``/``iou`` from counts pooled over all cases, and
    ``mean_case_dice`` (the mean over cases of each case's Dice, as nnU-Net's ``summary.json``,
    cases where a class is absent from both prediction and truth left out), plus ``per_case``.

    ``labels`` (name -> value) defaults to every value found in the ground truth or the predictions.
    Writes nothing; the CLI saves the returned dict as ``summary.json``.
    """
    gts = {os.path.splitext(n)[0]: os.path.join(gt_dir, n) for n in sorted(os.listdir(gt_dir)) if n.lower().endswith(IMAGE_SUFFIXES)}
    if not gts:
        raise ValueError(f"no label files in --gt {gt_dir!r}")
    missing = [c for c in gts if not os.path.isfile(os.path.join(pred_dir, c + ".png"))]
    if missing:
        raise FileNotFoundError(f"--pred {pred_dir!r} has no prediction for {len(missing)} case(s), e.g. {missing[0]}.png")
    arrays = {c: (read_label(os.path.join(pred_dir, c + ".png")), read_label(p)) for c, p in gts.items()}
    if labels is None:
        found = sorted(set().union(*(set(np.unique(g).tolist()) | set(np.unique(p).tolist()) for p, g in arrays.values())) - {ignore_value})
        labels = {("background" if v == 0 else f"class_{v}"): v for v in found}
    names, label_values = list(labels), list(labels.values())
    lut = {v: i for i, v in enumerate(label_values)}

    def to_index(a: np.ndarray, source: str) -> torch.Tensor:
        out = np.full(a.shape, IGNORE_INDEX, dtype=np.int64)
        for v in np.unique(a).tolist():
            if v in lut:
                out[a == v] = lut[v]
            elif v != ignore_value:
                raise ValueError(f"{source!r} has label value {v} that is not among {labels}")
        return torch.from_numpy(out)

    total = torch.zeros(len(names), 3, dtype=torch.int64)
    per_case = {}
    for case, (pred, gt) in arrays.items():
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {case}.png is {pred.shape} but its ground truth is {gt.shape}")
        counts = confusion_counts(to_index(pred, os.path.join(pred_dir, case + ".png")), to_index(gt, gts[case]), len(names))
        total += counts
        scores = dice_iou(counts)
        per_case[case] = {f"dice_{n}": _num(d) for n, d in zip(names, scores["dice"])}
    scores = dice_iou(total)
    fg = [d for d in scores["dice"][1:] if not np.isnan(d)]
    case_mean = {}
    for n in names:
        values_n = [c[f"dice_{n}"] for c in per_case.values() if c[f"dice_{n}"] is not None]
        case_mean[n] = float(np.mean(values_n)) if values_n else None
    fg_case = [case_mean[n] for n in names[1:] if case_mean[n] is not None]
    return {
        "labels": labels,
        "dice": {n: _num(d) for n, d in zip(names, scores["dice"])},
        "iou": {n: _num(d) for n, d in zip(names, scores["iou"])},
        "foreground_mean_dice": _num(np.mean(fg)) if fg else None,
        "mean_case_dice": case_mean,
        "foreground_mean_case_dice": float(np.mean(fg_case)) if fg_case else None,
        "per_case": per_case,
    }


def _num(value: float) -> Optional[float]:
    return None if value is None or np.isnan(value) else float(value)
