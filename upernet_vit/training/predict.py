"""Predict label maps for image files with a trained model, and evaluate predictions against ground truth."""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..fileio import atomic_write
from ..model import UperNetViT
from ..pretrained import WEIGHTS_NAME
from .augment import Normalizer
from .checkpoints import run_checkpoint
from .data import IGNORE_INDEX
from .image_io import IMAGE_SUFFIXES, read_image, read_label, write_label_png
from .data import read_case_image
from .inference import amp_dtype, check_scales, tta_probabilities
from .metrics import confusion_counts, dice_iou
from .trainer import PREPROCESSING_NAME

logger = logging.getLogger(__name__)



def predict_fast_paths(device: torch.device) -> Dict[str, bool]:
    """``upernet_vit.fast.optimize`` flags for prediction, chosen by measurement (README, Performance):
    channels_last made the eval head faster on both CPUs measured (Intel Xeon, AMD EPYC) and is not yet
    measured on CUDA; skipping the concat is as fast and needs less memory; Winograd is opt-in."""
    return {"channels_last": device.type == "cpu", "recompute_upsampled": True}


def resolve_model_dir(path: str, checkpoint: str = "final") -> str:
    """A ``save_pretrained`` folder as it is, or a run folder's checkpoint by ``checkpoint``: ``final`` (the
    last epoch of a finished run, the default, as nnU-Net), ``best`` (the EMA-Dice pick; a crash-stale
    ``checkpoint_best`` is skipped) or ``latest`` (see :func:`~upernet_vit.training.checkpoints.run_checkpoint`)."""
    if os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        return path
    candidate = run_checkpoint(path, checkpoint) if os.path.isdir(path) else None
    if candidate is not None and os.path.isfile(os.path.join(candidate, WEIGHTS_NAME)):
        return candidate
    raise FileNotFoundError(
        f"{path!r} is neither a model folder (model.safetensors + config.yaml) nor a run folder with checkpoints"
    )


def _input_files(path: str) -> List[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--input {path!r} does not exist")
    files = [os.path.join(path, n) for n in sorted(os.listdir(path)) if n.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {path!r}")
    return files


def group_input_files(path: str, in_chans: int) -> Dict[str, List[str]]:
    """``{case_id: channel files}`` for a model with ``in_chans`` input channels, after reading every file
    once, so that an unreadable, non-finite or wrong-channel input fails before anything is written.

    A case's id comes from its own file name only: a file with fewer channels than ``in_chans`` named
    ``<case>_XXXX`` is channel XXXX of ``<case>`` (nnU-Net's imagesTs naming, numbered from 0000); a file
    with all the channels is a case of its own, named by its stem without a trailing ``_0000``
    (``img_0000.png`` -> ``img``, ``img_0001.png`` -> ``img_0001``). Two inputs with one case id are an error.
    """
    from tqdm.auto import tqdm

    files = _input_files(path)
    shapes = {f: read_image(f).shape for f in tqdm(files, desc="check inputs", unit="file", disable=None, leave=False)}
    channels = {f: shape[0] for f, shape in shapes.items()}
    cases: Dict[str, List[tuple]] = {}
    for f in files:
        stem = os.path.splitext(os.path.basename(f))[0]
        match = re.match(r"^(.+)_(\d{4})$", stem)
        if match and channels[f] < in_chans:
            case, index = match.group(1), int(match.group(2))
        else:
            case, index = (match.group(1) if match and match.group(2) == "0000" else stem), -1
        cases.setdefault(case, []).append((index, f))
    for case, entries in cases.items():
        names = [os.path.basename(f) for _, f in sorted(entries)]
        total = sum(channels[f] for _, f in entries)
        if len(entries) > 1 and any(index < 0 for index, _ in entries):
            raise ValueError(f"--input files {names} would all be written as {case}.png; rename all but one")
        if total != in_chans:
            raise ValueError(
                f"--input case {case!r} ({', '.join(names)}) has {total} channel(s) but the model takes {in_chans}"
            )
        if sorted(i for i, _ in entries) not in ([-1], list(range(len(entries)))):
            raise ValueError(
                f"--input channel files {names} of case {case!r} must be numbered {case}_0000, {case}_0001, ... "
                f"without gaps (nnU-Net naming)"
            )
        if len({shapes[f][1:] for _, f in entries}) > 1:
            raise ValueError(f"--input channel files {names} of case {case!r} differ in size")
    return {case: [f for _, f in sorted(entries)] for case, entries in sorted(cases.items())}


def read_preprocessing(model_dir: str) -> Optional[Dict]:
    """A trained model folder's ``preprocessing.json`` (mean/std, normalization, label values, patch size);
    None for a bare ``save_pretrained`` folder."""
    path = os.path.join(model_dir, PREPROCESSING_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@dataclass
class _Member:
    """One model of an ensemble, with its own preprocessing."""

    folder: str
    model: UperNetViT
    normalizer: Normalizer
    label_values: List[int]
    patch_size: Optional[List[int]]


def _load_member(model_path: str, checkpoint: str, device: torch.device,
                 fast: Optional[Mapping[str, bool]]) -> _Member:
    folder = resolve_model_dir(model_path, checkpoint)
    model = UperNetViT.from_pretrained(folder).to(device).eval()
    if fast is not None:
        from ..fast import optimize

        optimize(model, **{**predict_fast_paths(device), **fast})
    prep = read_preprocessing(folder)
    if prep is None:  # a bare save_pretrained folder: the backbone's stats, labels 0..K-1, whole images
        logger.warning("%s not found: using the backbone's mean/std, labels 0..K-1 and whole-image inference",
                       os.path.join(folder, PREPROCESSING_NAME))
        prep = {"mean": list(model.mean), "std": list(model.std), "normalization": "preset",
                "label_values": list(range(model.num_classes)), "patch_size": None}
    normalizer = Normalizer(prep["mean"], prep["std"], prep["normalization"])
    return _Member(folder, model, normalizer, list(prep["label_values"]), prep["patch_size"])


def predict(
    model_path: Union[str, Sequence[str]],
    input_path: str,
    output_dir: str,
    device: str = "auto",
    step: float = 0.5,
    mirror: bool = False,
    save_probabilities: bool = False,
    amp: str = "none",
    fast: Optional[Mapping[str, bool]] = MappingProxyType({}),
    checkpoint: str = "final",
    scales: Sequence[float] = (1.0,),
) -> List[str]:
    """Write ``<case>.png`` label maps (dataset label values) and, if asked, ``<case>_probs.npz``
    (``probabilities [K, H, W]`` float16).

    ``model_path``: a run or model folder, or several (an ensemble, e.g. the 5 cross-validation folds: their
    probabilities are averaged; they must share label values and input channels). ``checkpoint``: which
    checkpoint of a run folder (``final``, ``best``, ``latest``; :func:`resolve_model_dir`). ``scales`` and
    ``mirror``: test-time augmentation (:func:`~upernet_vit.training.inference.tta_probabilities`).
    ``amp``: ``"none"``, ``"bf16"`` or ``"fp16"`` (CUDA only) autocast. ``fast``: flags for
    :func:`upernet_vit.fast.optimize` over :func:`predict_fast_paths` (``None``: the reference model as
    loaded). Every input is read and checked before anything is written. Returns the written mask paths."""
    from tqdm.auto import tqdm

    paths = [model_path] if isinstance(model_path, (str, os.PathLike)) else list(model_path)
    if not paths:
        raise ValueError("predict: give at least one --model")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    autocast_dtype = amp_dtype(amp, dev)
    check_scales(scales)
    members = [_load_member(os.fspath(p), checkpoint, dev, fast) for p in paths]
    first = members[0]
    for other in members[1:]:
        if other.label_values != first.label_values or other.model.in_chans != first.model.in_chans:
            raise ValueError(
                f"an ensemble needs models with the same labels and input channels: {first.folder} has label "
                f"values {first.label_values} and {first.model.in_chans} channel(s), {other.folder} has "
                f"{other.label_values} and {other.model.in_chans}"
            )
    values = np.asarray(first.label_values, dtype=np.int64)
    # reads every input once, so all input errors come before any output; the images are read again below
    # rather than kept, since a test set need not fit in memory
    cases = group_input_files(input_path, first.model.in_chans)
    os.makedirs(output_dir, exist_ok=True)
    written = []
    for case_id, files in tqdm(cases.items(), desc="predict", unit="case", disable=None):
        image = torch.from_numpy(read_case_image(files))
        probs = sum(
            tta_probabilities(m.model, m.normalizer(image).to(dev), m.patch_size, scales, step, mirror, autocast_dtype)
            for m in members
        ) / len(members)
        out = os.path.join(output_dir, f"{case_id}.png")
        write_label_png(out, values[probs.argmax(0).cpu().numpy()])
        if save_probabilities:
            array = probs.cpu().numpy().astype(np.float16)
            atomic_write(os.path.join(output_dir, f"{case_id}_probs.npz"),
                         lambda p: _save_npz(p, probabilities=array))
        written.append(out)
    logger.info("wrote %d masks to %s", len(written), output_dir)
    return written


def _save_npz(path: str, **arrays: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: numpy would add ".npz" to a path without it
        np.savez_compressed(f, **arrays)


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
