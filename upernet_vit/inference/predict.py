"""Predict label maps for image files with one trained model or an ensemble: inputs checked against the
model's record before anything is written, outputs only into a folder apart from the inputs."""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..data.datasets import read_case_pages
from ..data.volumes import volume_inputs
from ..data.image_io import IMAGE_SUFFIXES, read_image_pages, write_label_png, write_label_stack
from ..data.volume_io import VOLUME_SUFFIXES, file_stem, is_volume, volume_axis, write_label_volume
from ..data.intensity import check_input_range
from ..data.normalization import Normalizer
from ..devices import resolve_device
from ..precision import SPELLINGS, autocast_dtype, canonical_precision
from ..fileio import atomic_write, read_json, write_text
from ..model import UperNetViT
from ..pretrained import PREPROCESSING_NAME, WEIGHTS_NAME, recorded_digests
from ..runs.checkpoints import resolve_model_dir
from ..runs.outputs import FolderLock, refuse_overlap
from ..runs.record import ModelRecord
from .evaluate import SUMMARY_NAME, is_evaluate_summary
from .sliding_window import check_scales, check_step, tta_probabilities, window_count

logger = logging.getLogger(__name__)

# the record, in an output folder, of the files predict wrote there and how: only those may be replaced
MANIFEST_NAME = "predictions.json"
LOCK_NAME = ".predict.lock"  # held while a predict writes the folder (outputs.FolderLock)
WRITTEN_BY = "upernet-vit predict"  # the record's mark: predict acts only on a record it wrote


def _input_files(path: str) -> List[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"input_path {path!r} does not exist")
    suffixes = IMAGE_SUFFIXES + VOLUME_SUFFIXES
    # a folder inside is a stack of section files (a model trained with data.stacks), read in natural order
    files = [os.path.join(path, n) for n in sorted(os.listdir(path))
             if n.lower().endswith(suffixes) or os.path.isdir(os.path.join(path, n))]
    if not files:
        raise ValueError(f"no image files ({', '.join(suffixes)}) or stack folders in {path!r}")
    return files


def group_input_files(path: str, in_chans: int) -> Dict[str, List[str]]:
    """``{case_id: channel files}`` of :func:`read_inputs`."""
    return read_inputs(path, in_chans)[0]


class InputStats(NamedTuple):
    height: int
    width: int
    low: float  # the smallest pixel value
    high: float  # the largest
    pages: int = 1  # a multi-page file (a z-stack): predicted page by page


def read_inputs(path: str, in_chans: int,
                slice_axis: Optional[int] = None) -> Tuple[Dict[str, List[str]], Dict[str, InputStats]]:
    """``({case_id: channel files}, {file: InputStats})`` for a model with ``in_chans`` input
    channels, after reading every file once, so that an unreadable, non-finite or wrong-channel input fails
    before anything is written.

    A case's id comes from its own file name only: a file with fewer channels than ``in_chans`` named
    ``<case>_XXXX`` is channel XXXX of ``<case>`` (nnU-Net's imagesTs naming, numbered from 0000); a file
    with all the channels is a case of its own, named by its stem without a trailing ``_0000``
    (``img_0000.png`` -> ``img``, ``img_0001.png`` -> ``img_0001``). Two inputs with one case id are an error.
    A multi-page file (every page as a viewer shows it) is a stack of 2D images; a case's channel files
    must then have the same page count.
    """
    from tqdm.auto import tqdm

    files = _input_files(path)
    shapes, stats = {}, {}
    for f in tqdm(files, desc="check inputs", unit="file", disable=None, leave=False):
        pages, _ = read_image_pages(f, slice_axis)
        shapes[f] = (len(pages),) + pages[0].shape
        stats[f] = InputStats(pages[0].shape[1], pages[0].shape[2], float(min(p.min() for p in pages)),
                              float(max(p.max() for p in pages)), len(pages))
    channels = {f: shape[1] for f, shape in shapes.items()}
    cases: Dict[str, List[tuple]] = {}
    for f in files:
        stem = os.path.basename(f) if os.path.isdir(f) else file_stem(f)
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
            raise ValueError(f"input_path files {names} would all be written as {case}.png; rename all but one")
        if total != in_chans:
            raise ValueError(
                f"input_path case {case!r} ({', '.join(names)}) has {total} channel(s) but the model takes {in_chans}"
            )
        if sorted(i for i, _ in entries) not in ([-1], list(range(len(entries)))):
            raise ValueError(
                f"input_path channel files {names} of case {case!r} must be numbered {case}_0000, {case}_0001, ... "
                f"without gaps (nnU-Net naming)"
            )
        if len({(shapes[f][0],) + shapes[f][2:] for _, f in entries}) > 1:
            raise ValueError(f"input_path channel files {names} of case {case!r} differ in size or page count")
    return {case: [f for _, f in sorted(entries)] for case, entries in sorted(cases.items())}, stats


class PredictionSet(NamedTuple):
    """What one predict call writes into its output folder: ``{file name: how it was made}`` (the input
    files, the models with their weights' sha256, the checkpoint and the settings), as ``predictions.json``
    records it."""

    files: Dict[str, Dict]


def _manifest(output_dir: str) -> Dict:
    """The folder's ``predictions.json`` ({} if none); one that predict did not write is refused, since
    predict would replace it and act on the files it lists."""
    path = os.path.join(output_dir, MANIFEST_NAME)
    if not os.path.lexists(path):
        return {}
    record = read_json(path) if os.path.isfile(path) else None
    if not (isinstance(record, dict) and record.get("written_by") == WRITTEN_BY):
        raise FileExistsError(
            f"output_dir {output_dir!r} holds a {MANIFEST_NAME} that predict did not write; predict never replaces "
            f"files it did not create: choose an empty or new output folder"
        )
    return record


def _recorded_files(record: Dict) -> Dict[str, Optional[Dict]]:
    """``{name: how it was made}`` of a record; an older record (a list of names) gives None for each. Only
    plain file names count: a record never sends predict outside its folder."""
    files = record.get("files", {})
    files = dict(files) if isinstance(files, dict) else {n: None for n in files}
    return {n: _canonical_settings(how) for n, how in files.items()
            if isinstance(n, str) and os.path.basename(n) == n and n not in ("", ".", "..")}


def _canonical_settings(how: Optional[Dict]) -> Optional[Dict]:
    """``how`` with its ``amp`` setting in the canonical spelling: a record written before precision.py
    ("none", "bf16") describes the same call as one written now ("float32", "bfloat16")."""
    settings = how.get("settings") if isinstance(how, dict) else None
    if isinstance(settings, dict) and settings.get("amp") in SPELLINGS:
        return {**how, "settings": {**settings, "amp": SPELLINGS[settings["amp"]]}}  # type: ignore[dict-item]
    return how


def check_output_folder(input_path: str, output_dir: str, planned: PredictionSet, overwrite: bool = False,
                        models: Sequence[str] = ()) -> List[str]:
    """Check, before anything is written, that predict may write ``planned`` into ``output_dir``; return
    the files of an earlier prediction set there that ``overwrite`` replaces (to remove first).

    Refused: an output folder that is the input, contains it or lies inside it; a file of ``planned`` that
    predict did not write there (its ``predictions.json`` lists what it wrote: predict never replaces the
    user's files); and, unless ``overwrite``, an earlier prediction set of other models, checkpoint,
    settings or inputs (one folder holds one prediction set; the same call again, e.g. after a crash,
    replaces its own files)."""
    refuse_overlap(output_dir, {"input_path": input_path, **{f"model_path {m}": m for m in models}}, "output_dir",
                   ": predict would write among the files it reads")
    earlier = _recorded_files(_manifest(output_dir))
    foreign = [n for n in planned.files if n not in earlier and os.path.lexists(os.path.join(output_dir, n))]
    if foreign:
        raise FileExistsError(
            f"output_dir {output_dir!r} already holds {foreign[0]!r} ({len(foreign)} such) that predict did not "
            f"write (it is not in {MANIFEST_NAME}): predict never replaces files it did not create (is this a "
            f"ground-truth or image folder?); choose an empty or new output folder"
        )
    present = {n: how for n, how in earlier.items() if os.path.isfile(os.path.join(output_dir, n))}
    if not present or earlier == planned.files:
        return []
    if not overwrite:
        raise FileExistsError(
            f"output_dir {output_dir!r} already holds another prediction set: {len(present)} file(s) (e.g. "
            f"{next(iter(present))!r}) {_difference(present, planned)}. One folder holds one prediction set, and "
            f"{MANIFEST_NAME} says which model made each file: choose a new output folder, or pass overwrite=True to "
            f"replace that whole set"
        )
    return sorted(present)


def _difference(present: Mapping[str, Optional[Dict]], planned: PredictionSet) -> str:
    """What sets an earlier prediction set apart from ``planned``, for the refusal."""
    made = [how for how in present.values() if how]
    if not made:
        return "written by an older upernet-vit, whose record does not say how"
    first, new = made[0], next(iter(planned.files.values()))
    models = ", ".join(m.get("folder", "?") for m in first.get("models", []))
    differs = [key for key in ("models", "checkpoint", "settings") if first.get(key) != new.get(key)]
    if {f for how in made for f in how.get("inputs", [])} != {f for how in planned.files.values() for f in how["inputs"]}:
        differs.append("inputs")
    return f"made by {models} (other {', '.join(differs) or 'outputs'})"


@dataclass
class _Member:
    """One model of an ensemble, with its own preprocessing."""

    folder: str
    model: UperNetViT
    normalizer: Normalizer
    label_values: List[int]
    patch_size: Optional[List[int]]
    intensity_range: List[float]
    has_record: bool  # preprocessing.json, not the caller's intensity_scale
    slice_axis: Optional[int] = None  # volumes: the record's (None: the axis of largest spacing)
    context: int = 0  # volumes: neighbouring slices on each side as channels (2.5-D)
    rules: Optional[List[Dict]] = None  # volumes: each channel's normalization (data/volumes.py)

    @property
    def channels(self) -> int:
        """The channels of the input files (the model's, less the context slices')."""
        return self.model.in_chans // (2 * self.context + 1)


def _load_member(model_path: str, checkpoint: str, device: torch.device,
                 fast: Optional[Mapping[str, bool]], intensity_scale: Optional[float]) -> _Member:
    folder = resolve_model_dir(model_path, checkpoint)
    model = UperNetViT.from_pretrained(folder)
    model.check_device(device)
    model = model.to(device).eval()
    if fast is not None:
        from ..fast import optimize

        optimize(model, **fast)  # its defaults for this device, in eval mode
    record = os.path.join(folder, PREPROCESSING_NAME)
    if model.preprocessing is not None:  # from_pretrained read it
        prep = ModelRecord.from_json(model.preprocessing, record)
    elif intensity_scale is None:
        raise FileNotFoundError(
            f"{record} not found (a bare save_pretrained folder): predict cannot know how the model's training "
            f"inputs were scaled and normalized, nor its label values. If it was trained on values divided by S, "
            f"then the backbone's mean/std (data.normalization: preset), give intensity_scale=S (e.g. 255 "
            f"for 8-bit images); labels are then written as 0..K-1"
        )
    else:  # the user's explicit statement of the preset normalization
        if not (math.isfinite(intensity_scale) and intensity_scale > 0):
            raise ValueError(f"intensity_scale={intensity_scale}: give a positive number, e.g. 255 for 8-bit images")
        logger.info("%s not found: inputs / %g, then the backbone's mean/std; labels 0..K-1; whole-image inference",
                    record, intensity_scale)
        prep = ModelRecord.for_untrained(model.mean, model.std, model.num_classes, intensity_scale)
    normalizer = Normalizer(prep.mean, prep.std, prep.normalization, prep.intensity_scale)
    return _Member(folder, model, normalizer, list(prep.label_values), prep.patch_size,
                   list(prep.intensity_range), model.preprocessing is not None, prep.slice_axis, prep.context_slices,
                   prep.channel_normalization)


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
    overwrite: bool = False,
    intensity_scale: Optional[float] = None,
    accept_intensity: bool = False,
) -> List[str]:
    """Write ``<case>.png`` label maps (dataset label values) and, if asked, ``<case>_probs.npz``
    (``probabilities [K, H, W]`` float16). A multi-page input (a z-stack) is predicted page by page into
    ``<case>.tif``, a mask of as many pages (probabilities ``[N, K, H, W]``).

    ``model_path``: a run or model folder, or several (an ensemble, e.g. the 5 cross-validation folds: their
    probabilities are averaged; they must share label values and input channels). ``checkpoint``: which
    checkpoint of a run folder (``final``, ``best``, ``latest``; :func:`resolve_model_dir`). ``scales`` and
    ``mirror``: test-time augmentation (:func:`~upernet_vit.inference.sliding_window.tta_probabilities`).
    ``amp``: autocast's dtype, any spelling of :mod:`upernet_vit.precision` (``"none"``, ``"bf16"``,
    ``"fp16"``: CUDA only). ``fast``: flags for
    :func:`upernet_vit.fast.optimize` over its defaults for the device, in eval mode (``None``: the reference model as
    loaded). ``overwrite``: replace an earlier prediction set of other models or inputs in ``output_dir``
    (its files, as its ``predictions.json`` lists them; :func:`check_output_folder`). ``intensity_scale``:
    for a model folder without ``preprocessing.json``, the number its training inputs were divided by.
    ``accept_intensity``: predict inputs whose value range does not match the training record (a warning
    instead of an error). Every input is read and checked before anything is written; one predict at a
    time writes a folder. Returns the written mask paths."""
    from tqdm.auto import tqdm

    paths = [model_path] if isinstance(model_path, (str, os.PathLike)) else list(model_path)
    if not paths:
        raise ValueError("predict: give at least one model_path")
    dev = resolve_device(device, option="device")
    compute_dtype = autocast_dtype(amp, dev)
    amp = canonical_precision(amp, "amp")  # recorded canonical: bf16 and bfloat16 are one setting
    check_scales(scales)
    check_step(step)
    members = [_load_member(os.fspath(p), checkpoint, dev, fast, intensity_scale) for p in paths]
    if intensity_scale is not None and all(m.has_record for m in members):
        raise ValueError(
            f"intensity_scale={intensity_scale:g} is for a model folder without preprocessing.json, but "
            f"{os.path.join(members[0].folder, PREPROCESSING_NAME)} records how the model's inputs are scaled "
            f"(intensity_scale {members[0].normalizer.scale:g}); leave it out"
        )
    first = members[0]
    for other in members[1:]:
        if (other.label_values, other.model.in_chans, other.normalizer.mode, other.slice_axis, other.context,
                other.rules) != (first.label_values, first.model.in_chans, first.normalizer.mode, first.slice_axis,
                                 first.context, first.rules):
            raise ValueError(
                f"an ensemble needs models with the same labels, input channels and slicing: {first.folder} has "
                f"label values {first.label_values}, {first.model.in_chans} channel(s), normalization "
                f"{first.normalizer.mode!r}, slice axis {first.slice_axis}, {first.context} context slice(s); "
                f"{other.folder} has {other.label_values}, {other.model.in_chans}, {other.normalizer.mode!r}, "
                f"{other.slice_axis}, {other.context}"
            )
    values = np.asarray(first.label_values, dtype=np.int64)
    # reads every input once, so all input errors come before any output; the images are read again below
    # rather than kept, since a test set need not fit in memory
    cases, stats = read_inputs(input_path, first.channels, first.slice_axis)
    for m in members:
        check_input_range({f: (s.low, s.high) for f, s in stats.items()}, m.normalizer.mode, m.normalizer.scale,
                          m.intensity_range, os.path.join(m.folder, PREPROCESSING_NAME), accept_intensity)
    pages = {c: stats[files[0]].pages for c, files in cases.items()}
    outputs = {c: [_mask_name(c, files[0], pages[c])] + ([f"{c}_probs.npz"] if save_probabilities else [])
               for c, files in cases.items()}
    made = {"models": [{"folder": os.path.abspath(m.folder), "weights_sha256": recorded_digests(m.folder).get(WEIGHTS_NAME)}
                       for m in members],
            "checkpoint": checkpoint,
            "settings": {"step": step, "scales": list(scales), "mirror": mirror, "amp": amp,
                         "fast": None if fast is None else dict(fast), "intensity_scale": intensity_scale}}
    planned = PredictionSet({name: {"inputs": [os.path.abspath(f) for f in cases[c]], **made}
                             for c, names in outputs.items() for name in names})
    folders = [m.folder for m in members]
    check_output_folder(input_path, output_dir, planned, overwrite, folders)  # nothing written: a refusal leaves no trace
    windows = sum(pages[c] * window_count(stats[files[0]].height, stats[files[0]].width, m.patch_size, scales, step)
                  for c, files in cases.items() for m in members)
    logger.info("predicting %d case%s: %d window%s of the model%s", len(cases), "" if len(cases) == 1 else "s", windows,
                "" if windows == 1 else "s", " (x4 with mirror=True)" if mirror else "")
    os.makedirs(output_dir, exist_ok=True)
    with FolderLock(output_dir, LOCK_NAME, "predict", "output_dir"):
        stale = check_output_folder(input_path, output_dir, planned, overwrite, folders)  # again, now that it is ours
        _replace_set(output_dir, stale, planned)
        written = []
        with tqdm(total=windows, desc="predict", unit="window", disable=None) as bar:
            for case_id, files in cases.items():
                bar.set_postfix(case=case_id)
                stack = read_case_pages(files, first.slice_axis)  # [N, C, H, W]
                images = (volume_inputs(stack, first.context, first.rules) if first.normalizer.mode == "volume"
                          else iter(stack))  # a volume's slices z-scored with its statistics, with context
                probs = torch.stack([
                    sum(tta_probabilities(m.model, m.normalizer(torch.from_numpy(image)).to(dev), m.patch_size,
                                          scales, step, mirror, compute_dtype, progress=bar.update)
                        for m in members) / len(members)
                    for image in images
                ])  # [N, K, H, W]
                out = os.path.join(output_dir, outputs[case_id][0])
                labels = values[probs.argmax(1).cpu().numpy()]
                if is_volume(files[0]):  # the input's geometry: affine, spacing, origin, direction
                    write_label_volume(out, labels, volume_axis(files[0], first.slice_axis), files[0])
                elif pages[case_id] > 1:
                    write_label_stack(out, labels)
                else:
                    write_label_png(out, labels[0])
                if save_probabilities:
                    array = probs.cpu().numpy().astype(np.float16)
                    array = array if pages[case_id] > 1 else array[0]
                    atomic_write(os.path.join(output_dir, outputs[case_id][1]),
                                 lambda p: _save_npz(p, probabilities=array))
                written.append(out)
        _write_manifest(output_dir, planned, complete=True)
    logger.info("wrote %d mask%s to %s", len(written), "" if len(written) == 1 else "s", output_dir)
    return written


def _mask_name(case: str, first_file: str, pages: int) -> str:
    """The mask file of a case: ``.nii.gz`` for a volume, ``.tif`` for a multi-page stack, else ``.png``."""
    if is_volume(first_file):
        return f"{case}.nii.gz"
    return f"{case}.tif" if pages > 1 else f"{case}.png"


def _replace_set(output_dir: str, stale: Sequence[str], planned: PredictionSet) -> None:
    """Record ``planned`` before its files are written (a crash leaves them listed, so the same call again
    may replace them), after removing the earlier set's files that ``overwrite`` replaces (and the
    ``summary.json`` that evaluate wrote about that set)."""
    for name in stale:
        os.remove(os.path.join(output_dir, name))
    summary = os.path.join(output_dir, SUMMARY_NAME)
    if stale and is_evaluate_summary(summary):
        os.remove(summary)
    if stale:
        logger.warning("overwrite=True: removed the %d file(s) of the earlier prediction set in %s", len(stale), output_dir)
    _write_manifest(output_dir, planned, complete=False)


def _write_manifest(output_dir: str, planned: PredictionSet, complete: bool) -> None:
    text = json.dumps({"written_by": WRITTEN_BY, "version": 2, "complete": complete,
                       "files": planned.files}, indent=1)
    atomic_write(os.path.join(output_dir, MANIFEST_NAME), lambda p: write_text(p, text))


def _save_npz(path: str, **arrays: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: numpy would add ".npz" to a path without it
        np.savez_compressed(f, **arrays)
