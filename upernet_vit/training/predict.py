"""Predict label maps for image files with a trained model, and evaluate predictions against ground truth."""
from __future__ import annotations

import json
import logging
import os
import re
from types import MappingProxyType
from typing import Dict, List, Mapping, Optional

import numpy as np
import torch

from ..model import UperNetViT
from .augment import Normalizer
from .data import IGNORE_INDEX
from .image_io import IMAGE_SUFFIXES, read_label, write_label_png
from .data import read_case_image
from .inference import amp_dtype, sliding_window_logits
from .metrics import confusion_counts, dice_iou
from .trainer import PREPROCESSING_NAME

logger = logging.getLogger(__name__)



def predict_fast_paths(device: torch.device) -> Dict[str, bool]:
    """``upernet_vit.fast.optimize`` flags for prediction, chosen by measurement (README, Performance):
    channels_last made the eval head faster on both CPUs measured (Intel Xeon, AMD EPYC) and is not yet
    measured on CUDA; skipping the concat is as fast and needs less memory; Winograd is opt-in."""
    return {"channels_last": device.type == "cpu", "recompute_upsampled": True}


def resolve_model_dir(path: str) -> str:
    """A ``save_pretrained`` folder, or a run folder (its ``checkpoint_best``, else ``checkpoint_latest``)."""
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    for name in ("checkpoint_best", "checkpoint_latest"):
        candidate = os.path.join(path, name)
        if os.path.isfile(os.path.join(candidate, "model.safetensors")):
            return candidate
    raise FileNotFoundError(
        f"{path!r} is neither a model folder (model.safetensors + config.yaml) nor a run folder with checkpoint_best/"
    )


def group_input_files(path: str, max_files_per_case: Optional[int] = None) -> Dict[str, List[str]]:
    """``{case_id: channel files}``. nnU-Net names ``<case>_0000.ext``, ``<case>_0001.ext``, ... are one case
    when every group numbers its files 0000.. consecutively (with at most ``max_files_per_case`` files,
    the model's input channels); otherwise every image is its own case (``img_0001.png``, ``img_0002.png``
    are two images)."""
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        files = [os.path.join(path, n) for n in sorted(os.listdir(path)) if n.lower().endswith(IMAGE_SUFFIXES)]
    else:
        raise FileNotFoundError(f"--input {path!r} does not exist")
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {path!r}")
    groups: Dict[str, List[tuple]] = {}
    for f in files:
        match = re.match(r"^(.+)_(\d{4})$", os.path.splitext(os.path.basename(f))[0])
        if match is None:
            break
        groups.setdefault(match.group(1), []).append((int(match.group(2)), f))
    else:
        consecutive = all(sorted(i for i, _ in g) == list(range(len(g))) for g in groups.values())
        sizes_ok = max_files_per_case is None or all(len(g) <= max_files_per_case for g in groups.values())
        if consecutive and sizes_ok:
            return {k: [f for _, f in sorted(g)] for k, g in sorted(groups.items())}
    return {os.path.splitext(os.path.basename(f))[0]: [f] for f in files}


def read_preprocessing(model_dir: str) -> Optional[Dict]:
    """A trained model folder's ``preprocessing.json`` (mean/std, normalization, label values, patch size);
    None for a bare ``save_pretrained`` folder."""
    path = os.path.join(model_dir, PREPROCESSING_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def predict(
    model_path: str,
    input_path: str,
    output_dir: str,
    device: str = "auto",
    step: float = 0.5,
    mirror: bool = False,
    save_probabilities: bool = False,
    amp: str = "none",
    fast: Optional[Mapping[str, bool]] = MappingProxyType({}),
) -> List[str]:
    """Write ``<case>.png`` label maps (dataset label values) and, if asked, ``<case>_probs.npz``
    (``probabilities [K, H, W]`` float16). ``amp``: ``"none"``, ``"bf16"`` or ``"fp16"`` (CUDA only)
    autocast for the forward passes. ``fast``: flags for :func:`upernet_vit.fast.optimize` over
    :func:`predict_fast_paths` (``None``: the reference model as loaded). Returns the written mask paths."""
    from tqdm.auto import tqdm

    model_dir = resolve_model_dir(model_path)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    autocast_dtype = amp_dtype(amp, dev)
    model = UperNetViT.from_pretrained(model_dir).to(dev).eval()
    if fast is not None:
        from ..fast import optimize

        optimize(model, **{**predict_fast_paths(dev), **fast})
    prep = read_preprocessing(model_dir)
    if prep is None:  # a bare save_pretrained folder: the backbone's stats, labels 0..K-1, whole images
        logger.warning("%s not found: using the backbone's mean/std, labels 0..K-1 and whole-image inference",
                       os.path.join(model_dir, PREPROCESSING_NAME))
        prep = {"mean": list(model.mean), "std": list(model.std), "normalization": "preset",
                "label_values": list(range(model.num_classes)), "patch_size": None}
    normalizer = Normalizer(prep["mean"], prep["std"], prep["normalization"])
    values = np.asarray(prep["label_values"], dtype=np.int64)
    os.makedirs(output_dir, exist_ok=True)
    written = []
    for case_id, files in tqdm(group_input_files(input_path, model.in_chans).items(), desc="predict", unit="case", disable=None):
        image = read_case_image(files)
        if image.shape[0] != model.in_chans:
            raise ValueError(
                f"{files[0]!r} has {image.shape[0]} channel(s) but the model was trained on {model.in_chans}"
            )
        x = normalizer(torch.from_numpy(image)).to(dev)
        patch = prep["patch_size"] or list(x.shape[-2:])
        logits = sliding_window_logits(model, x, patch, step=step, mirror=mirror, amp_dtype=autocast_dtype)
        probs = logits.softmax(0)
        out = os.path.join(output_dir, f"{case_id}.png")
        write_label_png(out, values[probs.argmax(0).cpu().numpy()])
        if save_probabilities:
            np.savez_compressed(os.path.join(output_dir, f"{case_id}_probs.npz"), probabilities=probs.cpu().numpy().astype(np.float16))
        written.append(out)
    logger.info("wrote %d masks to %s", len(written), output_dir)
    return written


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
