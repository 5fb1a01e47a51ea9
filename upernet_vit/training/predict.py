"""Predict label maps for image files with one trained model or an ensemble: inputs checked against the
model's record before anything is written, outputs only into a folder apart from the inputs."""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..fileio import atomic_write, read_json, write_text
from ..model import UperNetViT
from ..pretrained import PREPROCESSING_NAME, WEIGHTS_NAME
from .augment import Normalizer
from .checkpoints import BEST, best_checkpoint, latest_checkpoint, run_checkpoint
from .data import read_case_image
from .distributed import resolve_device
from .image_io import IMAGE_SUFFIXES, read_image, write_label_png
from .inference import amp_dtype, check_scales, check_step, tta_probabilities, window_count
from .intensity import check_input_range

logger = logging.getLogger(__name__)

# the record, in an output folder, of the files predict wrote there: only those may be replaced
MANIFEST_NAME = "predictions.json"


def resolve_model_dir(path: str, checkpoint: str = "final") -> str:
    """A ``save_pretrained`` folder as it is, or a run folder's checkpoint by ``checkpoint``: ``final`` (the
    last epoch of a finished run, the default, as nnU-Net), ``best`` (the EMA-Dice pick; a crash-stale
    ``checkpoint_best`` is skipped) or ``latest`` (see :func:`~upernet_vit.training.checkpoints.run_checkpoint`).
    A run's ``checkpoint_best`` given directly is held against the run's record in the same way."""
    if os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        run_dir, name = os.path.split(os.path.normpath(path))
        if name == BEST and latest_checkpoint(run_dir):
            holder = best_checkpoint(run_dir)
            if holder is not None and os.path.normpath(holder) != os.path.normpath(path):
                logger.warning("using %s, which holds the run's best epoch, instead of %s", holder, path)
                return holder
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
    """``{case_id: channel files}`` of :func:`read_inputs`."""
    return read_inputs(path, in_chans)[0]


class InputStats(NamedTuple):
    height: int
    width: int
    low: float  # the smallest pixel value
    high: float  # the largest


def read_inputs(path: str, in_chans: int) -> Tuple[Dict[str, List[str]], Dict[str, InputStats]]:
    """``({case_id: channel files}, {file: InputStats})`` for a model with ``in_chans`` input
    channels, after reading every file once, so that an unreadable, non-finite or wrong-channel input fails
    before anything is written.

    A case's id comes from its own file name only: a file with fewer channels than ``in_chans`` named
    ``<case>_XXXX`` is channel XXXX of ``<case>`` (nnU-Net's imagesTs naming, numbered from 0000); a file
    with all the channels is a case of its own, named by its stem without a trailing ``_0000``
    (``img_0000.png`` -> ``img``, ``img_0001.png`` -> ``img_0001``). Two inputs with one case id are an error.
    """
    from tqdm.auto import tqdm

    files = _input_files(path)
    shapes, stats = {}, {}
    for f in tqdm(files, desc="check inputs", unit="file", disable=None, leave=False):
        image = read_image(f)
        shapes[f] = image.shape
        stats[f] = InputStats(image.shape[1], image.shape[2], float(image.min()), float(image.max()))
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
    return {case: [f for _, f in sorted(entries)] for case, entries in sorted(cases.items())}, stats


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


def check_output_folder(input_path: str, output_dir: str, outputs: Sequence[str]) -> None:
    """Refuse, before anything is written, an output folder that is the input, contains it or lies inside
    it, and one that holds a file of ``outputs`` (names) that predict did not write there (its
    ``predictions.json`` lists what it wrote): predict never replaces the user's files."""
    inp, out = os.path.realpath(input_path), os.path.realpath(output_dir)
    if out == inp or inp.startswith(out.rstrip(os.sep) + os.sep) or (
            os.path.isdir(inp) and out.startswith(inp.rstrip(os.sep) + os.sep)):
        where = "is" if out == inp else ("contains" if inp.startswith(out) else "lies inside")
        raise ValueError(
            f"--output {output_dir!r} {where} the --input {input_path!r}: predict would write masks among the "
            f"images; choose an output folder apart from the input"
        )
    ours = set(_manifest(output_dir).get("files", []))
    foreign = [n for n in outputs if n not in ours and os.path.lexists(os.path.join(output_dir, n))]
    if foreign:
        raise ValueError(
            f"--output {output_dir!r} already holds {foreign[0]!r} ({len(foreign)} such) that predict did not "
            f"write (it is not in {MANIFEST_NAME}): predict never replaces files it did not create (is this a "
            f"ground-truth or image folder?); choose an empty or new output folder"
        )


def _manifest(output_dir: str) -> Dict:
    path = os.path.join(output_dir, MANIFEST_NAME)
    return read_json(path) if os.path.isfile(path) else {}


@dataclass
class _Member:
    """One model of an ensemble, with its own preprocessing."""

    folder: str
    model: UperNetViT
    normalizer: Normalizer
    label_values: List[int]
    patch_size: Optional[List[int]]
    intensity_range: List[float]


def _load_member(model_path: str, checkpoint: str, device: torch.device,
                 fast: Optional[Mapping[str, bool]]) -> _Member:
    folder = resolve_model_dir(model_path, checkpoint)
    model = UperNetViT.from_pretrained(folder)
    model.check_device(device)
    model = model.to(device).eval()
    if fast is not None:
        from ..fast import optimize

        optimize(model, **fast)  # its defaults for this device, in eval mode
    record = os.path.join(folder, PREPROCESSING_NAME)
    if model.preprocessing is not None:  # from_pretrained read it
        prep = check_preprocessing(model.preprocessing, record)
    else:  # a bare save_pretrained folder: 8-bit inputs, the backbone's stats, labels 0..K-1
        logger.warning("%s not found: taking 8-bit inputs (values / 255, then the backbone's mean/std), labels "
                       "0..K-1 and whole-image inference", record)
        prep = {"mean": list(model.mean), "std": list(model.std), "normalization": "preset",
                "label_values": list(range(model.num_classes)), "patch_size": None, "intensity_scale": 255.0,
                "intensity_range": [0.0, 255.0]}
    normalizer = Normalizer(prep["mean"], prep["std"], prep["normalization"], prep["intensity_scale"])
    return _Member(folder, model, normalizer, list(prep["label_values"]), prep["patch_size"],
                   list(prep["intensity_range"]))


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
    :func:`upernet_vit.fast.optimize` over its defaults for the device, in eval mode (``None``: the reference model as
    loaded). Every input is read and checked before anything is written. Returns the written mask paths."""
    from tqdm.auto import tqdm

    paths = [model_path] if isinstance(model_path, (str, os.PathLike)) else list(model_path)
    if not paths:
        raise ValueError("predict: give at least one --model")
    dev = resolve_device(device, option="--device")
    autocast_dtype = amp_dtype(amp, dev)
    check_scales(scales)
    check_step(step)
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
    cases, stats = read_inputs(input_path, first.model.in_chans)
    for m in members:
        check_input_range({f: (s.low, s.high) for f, s in stats.items()}, m.normalizer.mode, m.normalizer.scale,
                          m.intensity_range, os.path.join(m.folder, PREPROCESSING_NAME))
    outputs = {c: [f"{c}.png"] + ([f"{c}_probs.npz"] if save_probabilities else []) for c in cases}
    check_output_folder(input_path, output_dir, [n for names in outputs.values() for n in names])
    windows = sum(window_count(stats[files[0]].height, stats[files[0]].width, m.patch_size, scales, step)
                  for files in cases.values() for m in members)
    logger.info("predicting %d case(s): %d windows of the model%s", len(cases), windows,
                " (x4 with --mirror)" if mirror else "")
    os.makedirs(output_dir, exist_ok=True)
    _record_outputs(output_dir, [n for names in outputs.values() for n in names], {
        "models": [m.folder for m in members], "step": step, "scales": list(scales), "mirror": mirror})
    written = []
    with tqdm(total=windows, desc="predict", unit="window", disable=None) as bar:
        for case_id, files in cases.items():
            bar.set_postfix(case=case_id)
            image = torch.from_numpy(read_case_image(files))
            probs = sum(
                tta_probabilities(m.model, m.normalizer(image).to(dev), m.patch_size, scales, step, mirror,
                                  autocast_dtype, progress=bar.update)
                for m in members
            ) / len(members)
            out = os.path.join(output_dir, outputs[case_id][0])
            write_label_png(out, values[probs.argmax(0).cpu().numpy()])
            if save_probabilities:
                array = probs.cpu().numpy().astype(np.float16)
                atomic_write(os.path.join(output_dir, outputs[case_id][1]),
                             lambda p: _save_npz(p, probabilities=array))
            written.append(out)
    logger.info("wrote %d masks to %s", len(written), output_dir)
    return written


def _record_outputs(output_dir: str, names: Sequence[str], settings: Dict) -> None:
    """Add ``names`` to the output folder's ``predictions.json`` before they are written (a crash leaves
    them listed, so the next run may replace them)."""
    files = sorted(set(_manifest(output_dir).get("files", [])) | set(names))
    text = json.dumps({"written_by": "upernet-vit predict", **settings, "files": files}, indent=1)
    atomic_write(os.path.join(output_dir, MANIFEST_NAME), lambda p: write_text(p, text))


def _save_npz(path: str, **arrays: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: numpy would add ".npz" to a path without it
        np.savez_compressed(f, **arrays)
