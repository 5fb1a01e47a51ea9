"""Volumes as 2-D training data: a volume case cut into slices, each normalized with its volume's or the
dataset's statistics, with neighbouring slices as extra channels (2.5-D).

    volume case   image [S, C, H, W], label [S, H, W]        (read_volume_case: one file per channel)
    slice s       pixels [(2k+1) C, H, W]                     slices s-k .. s+k, the ends repeated
                  label  [H, W]

Normalization, per channel, as nnU-Net does (``channel_normalization``, recorded with the model):

    ct       a channel named "CT" in dataset.json: clip to the 0.5 and 99.5 percentiles of the training
             set's foreground voxels, then z-score with their mean and std (one set of numbers for the
             dataset: Hounsfield units mean the same in every scan)
    zscore   any other channel: z-score with the volume's own mean and std

The per-volume numbers (channel mean and std, each slice's class pixels, a sample of foreground voxels for
the CT statistics) are computed once, when the volume is read (:func:`volume_stats`), and kept in the data
cache's index, so no later run reads a volume whole for them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np

from .datasets import Case, DatasetInfo
from .intensity import full_scale
from .volume_io import check_same_geometry, read_label_volume, read_volume_slices, volume_spacing

logger = logging.getLogger(__name__)

FOREGROUND_SAMPLE = 10_000  # voxels per volume and channel for the CT statistics (nnU-Net's number)


@dataclass
class VolumeSlice(Case):
    """Slice ``index`` of a volume, with ``context`` neighbours on each side as extra channels:
    ``pixels()`` is ``[(2k+1) C, H, W]`` (module docstring), each channel clipped to ``[low, high]`` and
    z-scored with ``mean`` and ``std``. ``image`` and ``label`` are the slice's own ``[C, H, W]`` and
    ``[H, W]`` (views of the volume)."""

    volume: Optional[np.ndarray] = None  # [S, C, H, W] (a read-only map when cached)
    index: int = 0
    context: int = 0
    mean: Optional[np.ndarray] = None  # [C]
    std: Optional[np.ndarray] = None  # [C]
    low: Optional[np.ndarray] = None  # [C] clip bounds (-inf / inf: none)
    high: Optional[np.ndarray] = None

    def pixels(self) -> np.ndarray:
        count = self.volume.shape[0]  # type: ignore[union-attr]
        picked = np.clip(np.arange(self.index - self.context, self.index + self.context + 1), 0, count - 1)
        x = np.asarray(self.volume[picked], dtype=np.float32)  # type: ignore[index]  # [2k+1, C, H, W]
        x = np.clip(x, self.low[None, :, None, None], self.high[None, :, None, None])  # type: ignore[index]
        x = (x - self.mean[None, :, None, None]) / self.std[None, :, None, None]  # type: ignore[index]
        return x.reshape(-1, *x.shape[2:]).astype(np.float32)


def read_volume_case(case_id: str, files: Sequence[str], label_path: str, info: DatasetInfo,
                     axis: Optional[int] = None) -> Case:
    """A volume case: ``image [S, C, H, W]`` (one file per channel, slices along ``axis``, default the one of
    largest spacing) and ``label [S, H, W]`` class indices, with its :func:`volume_stats`. Channel files and
    label must share shape and affine; each error names the files."""
    slices, integer, chosen = read_volume_slices(files[0], axis)
    channels = [np.stack(slices)[:, 0]]
    for f in files[1:]:
        check_same_geometry(files[0], f)
        channels.append(np.stack(read_volume_slices(f, chosen)[0])[:, 0])
    image = np.stack(channels, axis=1)  # [S, C, H, W]
    check_same_geometry(files[0], label_path)
    label = info.to_indices(read_label_volume(label_path, chosen), label_path)
    low, high = (float(image.min()), float(image.max())) if image.size else (0.0, 0.0)
    stats = volume_stats(image, label, info.num_classes)
    stats["in_plane_spacing"] = [z for i, z in enumerate(volume_spacing(files[0])) if i != chosen]
    return Case(case_id, image, label, full_scale(image, integer), files[0], (low, high), None, stats)


def read_stack_case(case_id: str, files: Sequence[str], label_path: str, info: DatasetInfo) -> Case:
    """A z-stack of 2-D pages as a volume case (``data.stacks``): the channel files' pages ``[N, C, H, W]``
    (e.g. a multi-page TIFF of electron-microscopy sections) with the label file's pages ``[N, H, W]``;
    their page counts and sizes must agree."""
    from .datasets import read_case_pages
    from .image_io import read_label_pages

    image = read_case_pages(files)
    label = read_label_pages(label_path)
    if label.shape[0] != image.shape[0] or label.shape[1:] != image.shape[2:]:
        raise ValueError(f"stack {files[0]!r} has {image.shape[0]} page(s) of {image.shape[2]}x{image.shape[3]} "
                         f"but its label {label_path!r} has {label.shape[0]} of {label.shape[1]}x{label.shape[2]}; "
                         f"they must match page for page")
    label = info.to_indices(label, label_path)
    integer = np.issubdtype(image.dtype, np.integer) or bool(np.array_equal(image, np.round(image)))
    low, high = (float(image.min()), float(image.max())) if image.size else (0.0, 0.0)
    return Case(case_id, image, label, full_scale(image, integer), files[0], (low, high), None,
                volume_stats(image, label, info.num_classes))


def volume_stats(image: np.ndarray, label: np.ndarray, num_classes: int) -> Dict[str, Any]:
    """What cutting a volume into slices needs without reading it again: each channel's mean and std
    (float64 sums, one slice at a time), each slice's pixels per class, and up to ``FOREGROUND_SAMPLE``
    foreground voxels per channel (``[C, n]``, a fixed random choice) for the CT statistics."""
    count, channels = image.shape[0], image.shape[1]
    sums, squares = np.zeros(channels), np.zeros(channels)
    for s in range(count):
        x = np.asarray(image[s], dtype=np.float64).reshape(channels, -1)
        sums += x.sum(1)
        squares += (x * x).sum(1)
    n = max(image[0, 0].size * count, 1)
    mean = sums / n
    std = np.sqrt(np.maximum(squares / n - mean * mean, 0.0))
    per_slice = [np.bincount(np.asarray(label[s])[np.asarray(label[s]) >= 0].ravel(), minlength=num_classes)
                 [:num_classes].tolist() for s in range(count)]
    where = np.flatnonzero(np.asarray(label) > 0)
    picked = np.sort(np.random.default_rng(0).choice(where, min(FOREGROUND_SAMPLE, where.size), replace=False))
    s, h, w = np.unravel_index(picked, label.shape)  # the voxels themselves: no copy of the volume
    sample = np.stack([np.asarray(image[s, c, h, w], dtype=np.float32) for c in range(channels)])
    return {"mean": mean.tolist(), "std": np.maximum(std, 1e-6).tolist(), "slice_class_pixels": per_slice,
            "foreground_sample": sample}


def channel_normalization(info: DatasetInfo, volumes: Sequence[Case]) -> List[Dict[str, Any]]:
    """Each channel's rule (module docstring) from the training ``volumes``: ``{"scheme": "ct", "clip": [lo,
    hi], "mean": m, "std": s}`` for a channel named CT, ``{"scheme": "zscore"}`` for the others."""
    rules: List[Dict[str, Any]] = []
    for c in range(info.num_channels):
        name = info.channel_names[c] if c < len(info.channel_names) else ""
        if name.upper() != "CT":
            rules.append({"scheme": "zscore"})
            continue
        pooled = np.concatenate([np.asarray(v.volume_stats["foreground_sample"])[c] for v in volumes  # type: ignore[index]
                                 if v.volume_stats is not None])
        if not pooled.size:
            logger.warning("channel %d (CT): the training volumes hold no foreground voxel; it is z-scored per "
                           "volume instead of with the CT statistics", c)
            rules.append({"scheme": "zscore"})
            continue
        low, high = np.percentile(pooled, [0.5, 99.5]).tolist()
        rules.append({"scheme": "ct", "clip": [float(low), float(high)], "mean": float(pooled.mean()),
                      "std": float(max(pooled.std(), 1e-6))})
        logger.info("channel %d (CT): clipped to [%.1f, %.1f] (the 0.5/99.5 percentiles of %d foreground "
                    "voxels), then z-scored with their mean %.1f and std %.1f", c, low, high, pooled.size,
                    rules[-1]["mean"], rules[-1]["std"])
    return rules


def _per_channel(rules: Sequence[Dict[str, Any]], mean: Sequence[float], std: Sequence[float]) -> List[np.ndarray]:
    """``[mean, std, low, high]`` arrays ``[C]``: the volume's numbers where the rule is zscore."""
    m, s = np.asarray(mean, np.float32).copy(), np.asarray(std, np.float32).copy()
    low, high = np.full(len(m), -np.inf, np.float32), np.full(len(m), np.inf, np.float32)
    for c, rule in enumerate(rules):
        if rule["scheme"] == "ct":
            m[c], s[c] = rule["mean"], rule["std"]
            low[c], high[c] = rule["clip"]
    return [m, s, low, high]


def volume_slices(case: Case, context: int, num_classes: int,
                  rules: Optional[Sequence[Dict[str, Any]]] = None) -> List[VolumeSlice]:
    """The slices of a volume case (``image [S, C, H, W]``), each a 2-D case for training and validation,
    normalized by ``rules`` (:func:`channel_normalization`; default: every channel z-scored per volume)."""
    stats = case.volume_stats or volume_stats(case.image, case.label, num_classes)  # type: ignore[arg-type]
    channels = case.image.shape[1]
    mean, std, low, high = _per_channel(rules or [{"scheme": "zscore"}] * channels, stats["mean"], stats["std"])
    return [
        VolumeSlice(f"{case.case_id}/{s:04d}", case.image[s], case.label[s], None, case.source,  # type: ignore[index]
                    case.value_range, list(stats["slice_class_pixels"][s]), None, case.image, s, context,
                    mean, std, low, high)
        for s in range(case.image.shape[0])
    ]


def volume_inputs(stack: np.ndarray, context: int, rules: Optional[Sequence[Dict[str, Any]]]) -> Iterable[np.ndarray]:
    """What a volume model takes for each slice of ``stack`` ``[S, C, H, W]`` (a volume as read): the
    training rule of :class:`VolumeSlice`, with the recorded ``rules`` and this volume's statistics."""
    stats = volume_stats(stack, np.zeros((stack.shape[0], 1, 1), np.int64), 1)
    mean, std, low, high = _per_channel(rules or [{"scheme": "zscore"}] * stack.shape[1], stats["mean"], stats["std"])
    for s in range(stack.shape[0]):
        yield VolumeSlice("", stack[s], None, volume=stack, index=s, context=context, mean=mean, std=std,
                          low=low, high=high).pixels()


def volume_of(case: Case) -> str:
    """The volume a case belongs to (its own id for a 2-D case): folds never split a volume."""
    return case.case_id.rsplit("/", 1)[0] if isinstance(case, VolumeSlice) else case.case_id


def warn_mixed_spacing(volumes: Sequence[Case]) -> None:
    """Volumes whose in-plane spacing differs from the median by more than 10% are named in a warning with
    their figures: the model sees their structures at another size (they are not resampled)."""
    spacings = {v.case_id: v.volume_stats.get("in_plane_spacing") for v in volumes  # type: ignore[union-attr]
                if v.volume_stats and v.volume_stats.get("in_plane_spacing")}
    if len(spacings) < 2:
        return
    median = np.median(np.asarray(list(spacings.values())), axis=0)
    odd = {k: s for k, s in spacings.items() if np.any(np.abs(np.asarray(s) / median - 1) > 0.1)}
    if odd:
        shown = ", ".join(f"{k} {np.round(s, 3).tolist()}" for k, s in list(odd.items())[:5])
        logger.warning("%d of %d volumes have an in-plane spacing more than 10%% from the median %s mm (%s): "
                       "they are not resampled, so their structures appear at another size in pixels",
                       len(odd), len(spacings), np.round(median, 3).tolist(), shown)

