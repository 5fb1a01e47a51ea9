"""``evaluate``: Dice and IoU of predicted label maps against ground truth, pooled over cases and as the
mean over cases, and in nnU-Net v2's ``summary.json`` form (``metric_per_case``, ``mean``,
``foreground_mean``: per case and foreground label TP/FP/FN/TN, Dice and IoU, NaN where a label is in neither
file), which nnU-Net's own tools read. Reads label files only (a multi-page mask, such as
predict writes for a z-stack, is one case of N pages); :func:`write_summary` writes the result, never over a
file it did not write."""
from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Dict, List, Optional

import numpy as np
import torch

from ..data.datasets import IGNORE_INDEX
from ..data.image_io import IMAGE_SUFFIXES, read_label_pages
from ..data.volume_io import VOLUME_SUFFIXES, file_stem
from ..fileio import atomic_write, read_json, write_text
from ..runs.outputs import refuse_foreign_file, refuse_overlap
from .metrics import dice_iou

logger = logging.getLogger(__name__)

SUMMARY_NAME = "summary.json"  # the default summary, in the prediction folder
WRITTEN_BY = "upernet-vit evaluate"


def is_evaluate_summary(path: str) -> bool:
    """Whether ``path`` is a summary evaluate wrote (its ``written_by``, or, from before that key, the
    keys every summary has)."""
    try:
        record = read_json(path)
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and (record.get("written_by") == WRITTEN_BY or {
        "labels", "dice", "iou", "per_case", "mean_case_dice"} <= set(record))


def check_summary_path(path: str, pred_dir: str, gt_dir: str, labels_file: Optional[str] = None) -> None:
    """Refuse, before the evaluation, a summary ``path`` inside ``gt_dir``, one that is an input (a
    prediction, the labels file), and any existing file that is not an earlier summary of evaluate's."""
    refuse_overlap(path, {"gt_dir": gt_dir, "labels_file": labels_file}, "path", ": evaluate would write among the "
                   "ground truth")
    stem = file_stem(path)
    if (os.path.dirname(os.path.realpath(path)) == os.path.realpath(pred_dir)
            and path.lower().endswith(IMAGE_SUFFIXES + VOLUME_SUFFIXES)):
        raise ValueError(f"path {path!r} is the prediction {stem!r} in pred_dir {pred_dir!r}; choose a .json file")
    refuse_foreign_file(path, is_evaluate_summary, "path", "evaluate")


def write_summary(summary: Dict, path: str) -> None:
    """Write ``summary`` as JSON to ``path`` (checked first with :func:`check_summary_path`), atomically,
    marked as evaluate's own."""
    refuse_foreign_file(path, is_evaluate_summary, "path", "evaluate")  # nothing appeared there meanwhile
    text = json.dumps({"written_by": WRITTEN_BY, **summary}, indent=1)
    atomic_write(path, lambda p: write_text(p, text))


def evaluate(
    pred_dir: str, gt_dir: str, labels: Optional[Dict[str, int]] = None, ignore_value: Optional[int] = None
) -> Dict:
    """Per-class Dice and IoU, two ways: ``dice``/``iou`` from counts pooled over all cases, and
    ``mean_case_dice`` (the mean over cases of each case's Dice, as nnU-Net's ``summary.json``,
    cases where a class is absent from both prediction and truth left out), plus ``per_case``.

    ``labels`` (name -> value) defaults to every value found in the ground truth or the predictions.
    Writes nothing (:func:`write_summary` does). Predictions of values that no ground truth holds are
    warned of when ``labels`` is not given, and prediction files without ground truth are named and left out.
    """
    gts = _label_files(gt_dir)
    if not gts:
        raise ValueError(f"no label files in gt_dir {gt_dir!r}")
    preds = _label_files(pred_dir)
    missing = [c for c in gts if c not in preds]
    if missing:
        raise FileNotFoundError(f"pred_dir {pred_dir!r} has no prediction for {len(missing)} case(s), e.g. {missing[0]!r} "
                                f"(a label file named as {os.path.basename(gts[missing[0]])!r})")
    extra = sorted(set(preds) - set(gts))
    if extra:
        logger.warning("pred_dir %s holds %d prediction(s) without ground truth in %s, left out: %s", pred_dir,
                       len(extra), gt_dir, ", ".join(os.path.basename(preds[c]) for c in extra[:5]))
    arrays = {c: (read_label_pages(preds[c]), read_label_pages(p)) for c, p in gts.items()}
    gt_values = set().union(*(set(np.unique(g).tolist()) for _, g in arrays.values()))
    pred_values = set().union(*(set(np.unique(p).tolist()) for p, _ in arrays.values()))
    if labels is None:
        found = sorted((gt_values | pred_values) - {ignore_value})
        labels = {("background" if v == 0 else f"class_{v}"): v for v in found}
        stray = sorted(pred_values - gt_values - {ignore_value})
        if stray:
            logger.warning(
                "the predictions hold values %s that no ground-truth file in %s holds (it has %s): are they in "
                "another label set (e.g. 0/255)? Their pixels count as wrong; pass labels=... (name -> value, as in "
                "dataset.json) to name the classes, or convert the predictions", stray[:10], gt_dir, sorted(gt_values)[:10])
    names, label_values = list(labels), list(labels.values())
    lut = {v: i for i, v in enumerate(label_values)}

    def to_index(a: np.ndarray, source: str) -> np.ndarray:
        out = np.full(a.shape, IGNORE_INDEX, dtype=np.int64)
        for v in np.unique(a).tolist():
            if v in lut:
                out[a == v] = lut[v]
            elif v != ignore_value:
                raise ValueError(f"{source!r} has label value {v} that is not among {labels}")
        return out

    total = torch.zeros(len(names), 3, dtype=torch.int64)
    per_case, nnunet_cases = {}, []
    for case, (pred, gt) in arrays.items():
        if pred.shape != gt.shape:
            raise ValueError(
                f"prediction {preds[case]!r} is {_size(pred)} but its ground truth {gts[case]!r} is {_size(gt)}")
        # a prediction of the ignore value is no class: it misses what the truth holds there, as in nnU-Net
        counts = case_counts(to_index(pred, preds[case]), to_index(gt, gts[case]), len(names))
        total += torch.from_numpy(counts[:, :3])
        scores = dice_iou(torch.from_numpy(counts[:, :3]))
        per_case[case] = {f"dice_{n}": _num(d) for n, d in zip(names, scores["dice"])}
        nnunet_cases.append({"reference_file": gts[case], "prediction_file": preds[case], "metrics": {
            str(v): _nnunet_metrics(counts[i]) for i, v in enumerate(label_values) if v != 0}})
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
        **nnunet_summary(nnunet_cases),
    }


def case_counts(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """``[K, 4]`` int64 counts (TP, FP, FN, TN) per class index of one case, over the pixels (voxels) whose
    truth is not ``IGNORE_INDEX``; a predicted ``IGNORE_INDEX`` is no class (a miss where the truth has one)."""
    use = gt != IGNORE_INDEX
    scored = int(use.sum())
    out = np.zeros((num_classes, 4), dtype=np.int64)
    for k in range(num_classes):
        ref, hit = gt == k, (pred == k) & use
        tp = int(np.count_nonzero(ref & hit))
        fp, fn = int(np.count_nonzero(hit)) - tp, int(np.count_nonzero(ref)) - tp
        out[k] = (tp, fp, fn, scored - tp - fp - fn)
    return out


def _nnunet_metrics(counts: np.ndarray) -> Dict[str, float]:
    """One case's and class's entry of nnU-Net's ``summary.json`` (NaN Dice/IoU where the class is in
    neither the prediction nor the truth, as nnU-Net writes it)."""
    tp, fp, fn, tn = (int(c) for c in counts)
    return {"Dice": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan"),
            "IoU": tp / (tp + fp + fn) if tp + fp + fn else float("nan"),
            "FP": fp, "TP": tp, "FN": fn, "TN": tn, "n_pred": fp + tp, "n_ref": fn + tp}


def nnunet_summary(cases: List[Dict]) -> Dict:
    """nnU-Net v2's ``summary.json`` keys from its ``metric_per_case`` entries: ``mean`` (per foreground label,
    the NaN-skipping mean over cases of each metric) and ``foreground_mean`` (the mean of ``mean`` over labels),
    so that nnU-Net's ``load_summary_json`` and the tools built on it read our file."""
    labels = list(cases[0]["metrics"]) if cases else []
    metrics = ["Dice", "IoU", "FP", "TP", "FN", "TN", "n_pred", "n_ref"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a label absent everywhere: NaN, as nnU-Net's nanmean
        mean = {label: {m: float(np.nanmean([c["metrics"][label][m] for c in cases])) for m in metrics}
                for label in labels}
        foreground_mean = {m: float(np.mean([mean[label][m] for label in labels])) if labels else float("nan")
                           for m in metrics}
    return {"metric_per_case": cases, "mean": mean, "foreground_mean": foreground_mean}


def _label_files(folder: str) -> Dict[str, str]:
    """``{case: label file}`` of a folder (a case's ``.png`` before its ``.tif``, e.g. a stack's mask; NIfTI
    volumes by their name without ``.nii.gz``; a stack folder of section masks by its name)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder {folder!r} does not exist")
    found: Dict[str, str] = {}
    for name in sorted(os.listdir(folder), key=lambda n: (not n.lower().endswith(".png"), n)):
        path = os.path.join(folder, name)
        if os.path.isdir(path):  # a stack folder of section masks: one case, as a multi-page file is
            found.setdefault(name, path)
        elif name.lower().endswith(IMAGE_SUFFIXES + VOLUME_SUFFIXES):  # a volume: 3-D Dice over its slices
            found.setdefault(file_stem(name), path)
    return dict(sorted(found.items()))


def _size(labels: np.ndarray) -> str:
    pages, height, width = labels.shape
    return f"{height}x{width}" + (f" with {pages} pages" if pages > 1 else "")


def _num(value: float) -> Optional[float]:
    return None if value is None or np.isnan(value) else float(value)
