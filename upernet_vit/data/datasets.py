"""Datasets on disk: nnU-Net v2 raw 2D layout and plain image/mask folders (folds: :mod:`.splits`).

Each case is read and checked once, and handed to ``store`` (the data cache, :mod:`.cache`, writes it to a
memory-mappable file and hands back a case that reads from the map), so a dataset of any size passes
through memory one case at a time. Without ``store`` every case stays in memory (``[C, H, W]`` float32
pixel values as stored, ``[H, W]`` class indices). All checks run before training starts and name the file.
Classes come from ``dataset.json`` or ``data.labels``; without those, only mask values that look like a
label map (0..K-1 for a few K, or a binary 0/v mask) become classes.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..fileio import read_json
from .image_io import (IMAGE_SUFFIXES, describe_orientation, read_image_and_kind, read_image_pages, read_label,
                       read_label_pages)
from .volume_io import VOLUME_SUFFIXES, file_stem, is_volume
from .intensity import full_scale

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # class index meaning "no label here" (cross-entropy's default ignore_index)
# the most classes taken from mask values when data.labels is not set: a grayscale image given as a
# mask would otherwise become a 256-class problem
MAX_AUTO_CLASSES = 32


@dataclass
class Case:
    case_id: str
    image: np.ndarray  # [C, H, W] pixel values as stored: float32 in memory, the stored dtype in the cache's map
    label: Optional[np.ndarray]  # [H, W] class indices, IGNORE_INDEX where ignored (int64; int16 in the cache)
    full_scale: Optional[float] = None  # intensity.full_scale of the image (None: outside 0..65535)
    source: str = ""  # the (first) image file
    value_range: Optional[Tuple[float, float]] = None  # (min, max) pixel value; None: computed from image
    class_pixels: Optional[List[int]] = None  # pixels of each class index; None: counted from label
    # a volume ([S, C, H, W] image, [S, H, W] label): its channels' mean/std and each slice's class
    # pixels (volume_stats); None: computed when the volume is cut into slices
    volume_stats: Optional[Dict[str, Any]] = None

    def pixels(self) -> np.ndarray:
        """``[C, H, W]`` float32 pixel values as stored: a copy, read from the map when the case is cached."""
        return np.array(self.image, dtype=np.float32)

    def classes(self) -> np.ndarray:
        """``[H, W]`` int64 class indices (a copy)."""
        return np.array(self.label, dtype=np.int64)

    def pixel_range(self) -> Tuple[float, float]:
        """``(min, max)`` pixel value (from the cache's index when it holds them; 0, 0 for an empty image)."""
        if self.value_range is not None:
            return self.value_range
        return (float(self.image.min()), float(self.image.max())) if self.image.size else (0.0, 0.0)

    def present_classes(self) -> List[int]:
        """The class indices the label holds (IGNORE_INDEX left out)."""
        if self.class_pixels is not None:
            return [i for i, n in enumerate(self.class_pixels) if n]
        return [i for i in np.unique(self.label).tolist() if i >= 0]


Store = Callable[[Case], Case]  # what becomes of a case once it is read and checked (the data cache)


@dataclass
class DatasetInfo:
    name: str
    label_names: List[str]  # class index -> name
    label_values: List[int]  # class index -> value stored in label files
    num_channels: int
    file_ending: str = ".png"
    ignore_value: Optional[int] = None  # value in label files meaning "ignore"
    channel_names: List[str] = field(default_factory=list)  # dataset.json's (a "CT" channel: CT normalization)

    @property
    def num_classes(self) -> int:
        return len(self.label_values)

    def to_indices(self, label: np.ndarray, source: str) -> np.ndarray:
        """File values -> class indices; unknown values are an error naming ``source``."""
        allowed = list(self.label_values) + ([self.ignore_value] if self.ignore_value is not None else [])
        found = np.unique(label)
        bad = sorted(set(found.tolist()) - set(allowed))
        if bad:
            raise ValueError(
                f"label file {source!r} has values {bad[:10]} that are not among the dataset's labels "
                f"{dict(zip(self.label_names, self.label_values))}"
                + (f" or the ignore value {self.ignore_value}" if self.ignore_value is not None else "")
            )
        lut = {v: i for i, v in enumerate(self.label_values)}
        if self.ignore_value is not None:
            lut[self.ignore_value] = IGNORE_INDEX
        out = np.empty(label.shape, dtype=np.int64)
        for value in found.tolist():
            out[label == value] = lut[value]
        return out

    def to_values(self, indices: np.ndarray) -> np.ndarray:
        """Class indices -> the values written to label files."""
        return np.asarray(self.label_values, dtype=np.int64)[indices]


def _check_pair(image: np.ndarray, label: np.ndarray, image_path: str, label_path: str) -> None:
    if image.shape[1:] != label.shape:
        turned = image.shape[1:] == label.shape[::-1]
        raise ValueError(
            f"image {image_path!r} is {image.shape[1]}x{image.shape[2]} but its label {label_path!r} is "
            f"{label.shape[0]}x{label.shape[1]}; they must be the same size"
            + (f". The sizes are each other's turn by 90°: files are read as a viewer shows them, with their "
               f"EXIF orientation applied (the image has {describe_orientation(image_path)}, the label "
               f"{describe_orientation(label_path)}); save the mask in the orientation the image is shown in"
               if turned else "")
        )


# ---------------------------------------------------------------------------- nnU-Net raw layout
def read_dataset_json(root: str) -> dict:
    path = os.path.join(root, "dataset.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: an nnU-Net raw dataset folder needs dataset.json")
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise ValueError(f"{path} holds a JSON {type(meta).__name__}, not an object with channel_names, labels, file_ending")
    for key in ("channel_names", "labels", "file_ending"):
        if key not in meta:
            raise ValueError(f"{path} has no {key!r} key (nnU-Net v2 dataset.json needs channel_names, labels, file_ending)")
    return meta


def nnunet_info(root: str) -> DatasetInfo:
    meta = read_dataset_json(root)
    labels = dict(meta["labels"])
    ignore = labels.pop("ignore", None)
    for name, value in labels.items():
        if not isinstance(value, int):
            raise ValueError(
                f"{os.path.join(root, 'dataset.json')}: label {name!r} is {value!r}; region-based labels are not supported"
            )
    items = sorted(labels.items(), key=lambda kv: kv[1])
    if [v for _, v in items] != list(range(len(items))):
        raise ValueError(
            f"{os.path.join(root, 'dataset.json')}: labels must be consecutive 0..K-1 as nnU-Net requires, got {labels}"
        )
    return DatasetInfo(
        name=os.path.basename(os.path.normpath(root)),
        label_names=[k for k, _ in items],
        label_values=[v for _, v in items],
        num_channels=len(meta["channel_names"]),
        file_ending=meta["file_ending"],
        ignore_value=ignore,
        channel_names=[str(n) for _, n in sorted(dict(meta["channel_names"]).items(), key=lambda kv: int(kv[0]))],
    )


def nnunet_image_files(folder: str, file_ending: str) -> Dict[str, List[str]]:
    """``{case_id: [channel files in order]}`` from ``<case>_XXXX<ending>`` names."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder!r} does not exist")
    pattern = re.compile(rf"^(.+)_(\d{{4}}){re.escape(file_ending)}$")
    cases: Dict[str, List[Tuple[int, str]]] = {}
    for name in sorted(os.listdir(folder)):
        match = pattern.match(name)
        if match:
            cases.setdefault(match.group(1), []).append((int(match.group(2)), os.path.join(folder, name)))
    return {cid: [p for _, p in sorted(files)] for cid, files in sorted(cases.items())}


def read_case(files: Sequence[str]) -> Tuple[np.ndarray, Optional[float]]:
    """``([C, H, W] values, full scale)`` of one case's channel files (:func:`.intensity.full_scale`)."""
    read = [read_image_and_kind(f) for f in files]
    sizes = {a.shape[1:] for a, _ in read}
    if len(sizes) > 1:
        raise ValueError(f"the channel files of one case differ in size: {list(files)}")
    image = np.concatenate([a for a, _ in read], axis=0)
    return image, full_scale(image, all(integer for _, integer in read))


def read_case_pages(files: Sequence[str], slice_axis: Optional[int] = None) -> np.ndarray:
    """Channel files of one case, each of N pages (a stack; a volume's slices along ``slice_axis``), ->
    ``[N, C, H, W]`` pixel values as stored."""
    stacks = [np.stack(read_image_pages(f, slice_axis)[0]) for f in files]
    if len({s.shape[0] for s in stacks}) > 1 or len({s.shape[2:] for s in stacks}) > 1:
        raise ValueError(f"the channel files of one case differ in size or page count: {list(files)}")
    return np.concatenate(stacks, axis=1)


def load_nnunet_raw(root: str, store: Optional[Store] = None, slice_axis: Optional[int] = None,
                    stacks: bool = False) -> Tuple[DatasetInfo, List[Case]]:
    """Training cases of an nnU-Net v2 raw dataset (``imagesTr``/``labelsTr``), each passed through ``store``
    once read and checked (module docstring). With ``file_ending`` ``.nii.gz`` or ``.nii`` each case is a
    volume (:func:`read_volume_case`; ``slice_axis``: the axis slices are taken along, default the one of
    largest spacing). ``stacks``: multi-page 2-D files are z-stacks, each a volume of its pages."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder {root!r} does not exist (data.root)")
    info = nnunet_info(root)
    images = nnunet_image_files(os.path.join(root, "imagesTr"), info.file_ending)
    if not images:
        raise ValueError(f"no images named <case>_0000{info.file_ending} in {os.path.join(root, 'imagesTr')}")
    labels_dir = os.path.join(root, "labelsTr")
    if os.path.isdir(labels_dir):
        orphans = sorted(
            n for n in os.listdir(labels_dir)
            if n.endswith(info.file_ending) and n[: -len(info.file_ending)] not in images
        )
        if orphans:
            raise FileNotFoundError(
                f"label {os.path.join(labels_dir, orphans[0])!r} has no image "
                f"{os.path.join(root, 'imagesTr', orphans[0][: -len(info.file_ending)] + '_0000' + info.file_ending)!r} "
                f"({len(orphans)} without); add the image or remove the label"
            )
    cases = []
    for case_id, files in images.items():
        label_path = os.path.join(labels_dir, case_id + info.file_ending)
        if not os.path.isfile(label_path):
            raise FileNotFoundError(f"image {files[0]!r} has no label: {label_path!r} is missing")
        if is_volume(info.file_ending):
            from .volumes import read_volume_case  # volumes.py builds on this module's Case

            case = read_volume_case(case_id, files, label_path, info, slice_axis)
        elif stacks:
            from .volumes import read_stack_case

            case = read_stack_case(case_id, files, label_path, info)
        else:
            image, scale = read_case(files)
            label = read_label(label_path)
            _check_pair(image, label, files[0], label_path)
            case = Case(case_id, image, info.to_indices(label, label_path), scale, files[0])
        cases.append(store(case) if store else case)
    _check_channels(cases, os.path.join(root, "imagesTr"), info.num_channels, os.path.join(root, "dataset.json"))
    return info, cases


def _check_channels(cases: Sequence[Case], folder: str, declared: Optional[int] = None, where: str = "") -> int:
    """The one channel count of ``cases`` (``[C, H, W]`` images or ``[S, C, H, W]`` volumes); a ValueError
    if they differ or differ from ``declared``."""
    counts = {c.image.shape[-3] for c in cases}
    if len(counts) > 1:
        odd = [c.case_id for c in cases if c.image.shape[-3] != cases[0].image.shape[-3]][:5]
        raise ValueError(f"cases in {folder!r} have different channel counts {sorted(counts)} (e.g. {odd})")
    (channels,) = counts
    if declared is not None and channels != declared:
        raise ValueError(
            f"{where} declares {declared} channel(s) in channel_names but the images in {folder!r} hold "
            f"{channels} (e.g. {cases[0].source!r}; an RGB file counts 3); make channel_names list one name "
            f"per channel, or give one <case>_XXXX file per declared channel"
        )
    return channels


# ---------------------------------------------------------------------------- plain folders
def _by_stem(folder: str) -> Dict[str, str]:
    """``{case: path}`` of a folder's image files and stack folders (a folder is named as it is: a stack
    folder ``run.v2`` is case ``run.v2``)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder {folder!r} does not exist")
    found: Dict[str, str] = {}
    for n in sorted(os.listdir(folder)):
        path = os.path.join(folder, n)
        if os.path.isdir(path):
            found[n] = path
        elif n.lower().endswith(IMAGE_SUFFIXES + VOLUME_SUFFIXES):
            if file_stem(n) in found:
                raise ValueError(f"{found[file_stem(n)]!r} and {path!r} are one case {file_stem(n)!r}; keep one")
            found[file_stem(n)] = path
    return found


def load_folders(root: str, labels: Optional[Dict[str, int]] = None, store: Optional[Store] = None,
                 slice_axis: Optional[int] = None, stacks: bool = False) -> Tuple[DatasetInfo, List[Case]]:
    """``root/images/<name>.<ext>`` with ``root/masks/<name>.<ext>``. Label values: ``labels``
    (name -> value) if given, else every value found in the masks, sorted (a first pass over the masks).
    Each case is passed through ``store`` once read and checked (module docstring). NIfTI images and masks
    (``.nii.gz``, ``.nii``) are volumes (:func:`.volumes.read_volume_case`, slices along ``slice_axis``);
    a folder holds volumes or 2-D images, not both. ``stacks``: multi-page 2-D files (a TIFF z-stack) are
    volumes of their pages (:func:`.volumes.read_stack_case`)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder {root!r} does not exist (data.root)")
    images, masks = _by_stem(os.path.join(root, "images")), _by_stem(os.path.join(root, "masks"))
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {os.path.join(root, 'images')}")
    missing = [images[s] for s in images if s not in masks]
    if missing:
        raise FileNotFoundError(f"image {missing[0]!r} has no mask in {os.path.join(root, 'masks')} ({len(missing)} without)")
    orphans = [masks[s] for s in masks if s not in images]
    if orphans:
        raise FileNotFoundError(
            f"mask {orphans[0]!r} has no image in {os.path.join(root, 'images')} ({len(orphans)} without); "
            f"add the image or remove the mask"
        )
    folders = [p for p in list(images.values()) + list(masks.values()) if os.path.isdir(p)]
    if folders and not stacks:
        raise ValueError(f"{folders[0]!r} is a folder: set data.stacks: true if its files are the sections of one "
                         f"stack (images/<stack>/<section>.png with masks/<stack>/<section>.png), or move the "
                         f"files up into {os.path.dirname(folders[0])!r}")
    kinds = {is_volume(p) for p in list(images.values()) + list(masks.values())}
    if len(kinds) > 1:
        raise ValueError(f"{root!r} holds NIfTI volumes and 2-D image files in images/ or masks/; a dataset is one "
                         f"or the other: move one kind to a dataset of its own")
    volumes = kinds == {True}
    if volumes:
        from .volume_io import read_label_volume
        from .volumes import read_volume_case  # volumes.py builds on this module's Case

    def read_mask(path: str) -> np.ndarray:
        if volumes:
            return read_label_volume(path, slice_axis)
        return read_label_pages(path) if stacks else read_label(path)

    if labels:
        items = sorted(labels.items(), key=lambda kv: kv[1])
    else:  # one mask at a time: the masks of a large dataset need not fit in memory together
        items = labels_from_masks(((read_mask(masks[stem]), masks[stem]) for stem in images),
                                  os.path.join(root, "masks"))
    info = DatasetInfo(
        name=os.path.basename(os.path.normpath(root)),
        label_names=[k for k, _ in items],
        label_values=[v for _, v in items],
        num_channels=0,  # the images', below
        file_ending=".nii.gz" if volumes else ".png",
    )
    cases = []
    for stem, path in images.items():
        if volumes:
            case = read_volume_case(stem, [path], masks[stem], info, slice_axis)
        elif stacks:
            from .volumes import read_stack_case

            case = read_stack_case(stem, [path], masks[stem], info)
        else:
            (image, scale), label = read_case([path]), read_label(masks[stem])
            _check_pair(image, label, path, masks[stem])
            case = Case(stem, image, info.to_indices(label, masks[stem]), scale, path)
        cases.append(store(case) if store else case)
    info.num_channels = _check_channels(cases, os.path.join(root, "images"))
    return info, cases


def labels_from_masks(masks: Iterable[Tuple[np.ndarray, str]], folder: str) -> List[Tuple[str, int]]:
    """``[(name, value)]`` classes from the values found in ``masks`` (``(label, file)`` pairs, read one at a
    time from an iterator), when
    ``data.labels`` is not set. Only values that look like a label map are taken: 0..K-1 with
    K <= :data:`MAX_AUTO_CLASSES`, or a binary 0/v mask; anything else (a JPEG-damaged or grayscale mask, a
    stray value) is a ValueError that lists the values and asks for ``data.labels``."""
    counts: Dict[int, int] = {}
    where: Dict[int, str] = {}
    for label, path in masks:
        found, n = np.unique(label, return_counts=True)
        for value, count in zip(found.tolist(), n.tolist()):
            counts[value] = counts.get(value, 0) + count
            where.setdefault(value, path)
    values = sorted(counts)
    listed = ", ".join(f"{v}: {counts[v]}" for v in values[:12]) + (", ..." if len(values) > 12 else "")
    consecutive = values == list(range(len(values))) and len(values) <= MAX_AUTO_CLASSES
    binary = len(values) == 2 and values[0] == 0
    if not (consecutive or binary):
        odd = next((v for i, v in enumerate(values) if v != i), values[-1])
        raise ValueError(
            f"data.labels is not set and the masks in {folder!r} hold {len(values)} values ({listed} pixels) that "
            f"do not look like a label map (0..K-1 for up to {MAX_AUTO_CLASSES} classes, or a binary 0/v mask): "
            f"e.g. {odd} in {where[odd]!r}. Set data.labels (name: value) to the classes you mean, e.g. "
            f"{{background: 0, lesion: 1}}; values outside it are then reported by file"
        )
    items = [("background" if v == 0 else f"class_{v}", v) for v in values]
    logger.info(
        "data.labels is not set: the masks in %s hold the values %s (pixels), which become the classes %s; "
        "set data.labels (name: value) to fix the classes and refuse stray values",
        folder, listed, [k for k, _ in items],
    )
    return items


def absent_classes(info: DatasetInfo, cases: Sequence[Case]) -> List[int]:
    """Indices of the classes that no label of ``cases`` contains."""
    present = set()
    for case in cases:
        if case.label is not None:
            present.update(case.present_classes())
    return [i for i in range(info.num_classes) if i not in present]
