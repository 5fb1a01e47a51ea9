"""Per-class Dice and IoU from accumulated confusion counts (nnU-Net's online evaluation)."""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch

from ..data.datasets import IGNORE_INDEX


def confusion_counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[K, 3]`` int64 counts (TP, FP, FN) per class; ``IGNORE_INDEX`` pixels are skipped."""
    valid = target != IGNORE_INDEX
    pred, target = pred[valid].long(), target[valid].long()
    joint = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    cm = joint.reshape(num_classes, num_classes)  # rows: truth, columns: prediction
    tp = cm.diagonal()
    return torch.stack([tp, cm.sum(0) - tp, cm.sum(1) - tp], dim=1)


def dice_iou(counts: torch.Tensor) -> Dict[str, np.ndarray]:
    """``{"dice": [K], "iou": [K]}``; NaN for a class absent from both prediction and truth."""
    tp, fp, fn = (counts[:, i].double().numpy() for i in range(3))
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
    return {"dice": dice, "iou": iou}


def summarize(counts: torch.Tensor, label_names: Sequence[str], exclude: Sequence[int] = ()) -> Dict[str, float]:
    """Flat metric dict: ``dice_mean`` (foreground mean), ``iou_mean``, ``dice_<name>``, ``iou_<name>``.

    The means skip NaN classes (absent from prediction and truth, as nnU-Net's ``nanmean``) and the class
    indices in ``exclude`` (classes no training mask contains: reported, never learnable)."""
    scores = dice_iou(counts)
    out: Dict[str, float] = {}
    scored = [i for i in range(1, len(label_names)) if i not in set(exclude)]
    fg_dice: List[float] = [scores["dice"][i] for i in scored if not np.isnan(scores["dice"][i])]
    fg_iou: List[float] = [scores["iou"][i] for i in scored if not np.isnan(scores["iou"][i])]
    out["dice_mean"] = float(np.mean(fg_dice)) if fg_dice else float("nan")
    out["iou_mean"] = float(np.mean(fg_iou)) if fg_iou else float("nan")
    for name, d, j in zip(label_names, scores["dice"], scores["iou"]):
        out[f"dice_{name}"] = float(d)
        out[f"iou_{name}"] = float(j)
    return out
