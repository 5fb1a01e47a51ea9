"""The intensity rule: a pixel's value is the number stored in its file, whatever the container.

8-bit 200, 16-bit 200 and float 200.0 are one and the same input: nothing is rescaled by file type, so
the same pixels give the same mask from a PNG, a TIFF or a float TIFF. What maps the values to the
backbone's range is decided once, from the training images, and recorded with the model
(``preprocessing.json``: ``normalization``, ``intensity_scale``, ``intensity_range``):

- ``normalization: zscore``: each image, channel by channel, to zero mean and unit std. Scale-free: any
  value range and any mix of bit depths give the same result.
- ``normalization: preset`` (the default): ``x / intensity_scale``, then the backbone's mean/std, which
  expect [0, 1]. ``data.intensity_scale: auto`` takes the full scale of the training images' range: 1 when
  they are float images with every value in [0, 1], 255 when every value lies in 0..255, 65535 in 0..65535
  (an integer file is never put in the [0, 1] range: an all-dark 8-bit image is still 8-bit). Training
  images of different ranges (8-bit images beside 16-bit ones that use more than 8 bits) are refused,
  naming one file of each: one of the two kinds would train nearly black. A number given as
  ``data.intensity_scale`` states the scale and accepts any mix.

``predict`` holds each input against the record (:func:`check_input_range`): with ``preset``, values
outside ``[min(0, low), max(scale, high)]`` of the training images are an error naming the file, and an
input whose values all lie in [0, 1] while training reached far above is named in a warning (a rescaled
copy would predict as a nearly black image).
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

logger = logging.getLogger(__name__)

FULL_SCALES = (1.0, 255.0, 65535.0)
_RANGE_NAMES = {1.0: "float [0, 1]", 255.0: "8-bit 0..255", 65535.0: "16-bit 0..65535"}


def full_scale(values: np.ndarray, integer: bool) -> Optional[float]:
    """The smallest full scale (1 for float files only, 255, 65535) whose range ``[0, scale]`` holds every
    value of ``values``; None when none does (negative values, or above 65535)."""
    if values.size == 0:
        return 255.0 if integer else 1.0
    low, high = float(values.min()), float(values.max())
    if low < 0:
        return None
    return next((s for s in FULL_SCALES if high <= s and (s > 1 or not integer)), None)


def choose_intensity_scale(
    scales: Dict[str, Optional[float]], normalization: str, configured: Union[str, float]
) -> float:
    """``data.intensity_scale`` for a training set whose images (``{file: full_scale(...)}``) are known.

    A number is taken as given; ``zscore`` needs none (1.0 is recorded); ``auto`` with ``preset`` is the one
    full scale of every image, or a ValueError naming the files that do not share it."""
    if configured != "auto":
        return float(configured)
    if normalization == "zscore":
        return 1.0
    outside = [f for f, s in scales.items() if s is None]
    if outside:
        raise ValueError(
            f"training image {outside[0]!r} ({len(outside)} such) has values below 0 or above 65535, which no "
            f"full scale maps to [0, 1] for the backbone's mean/std (data.normalization: preset); set "
            f"data.normalization: zscore (per-image), or data.intensity_scale to the number that maps your "
            f"values to about [0, 1]"
        )
    groups: Dict[float, List[str]] = {}
    for f, s in scales.items():
        groups.setdefault(float(s), []).append(f)  # type: ignore[arg-type]
    if len(groups) > 1:
        kinds = "; ".join(
            f"{len(files)} in {_RANGE_NAMES[s]} (e.g. {files[0]!r})" for s, files in sorted(groups.items())
        )
        raise ValueError(
            f"the training images lie in different value ranges: {kinds}. Pixel values are used as stored, so "
            f"one kind would train nearly black. Convert them to one bit depth, or set data.normalization: "
            f"zscore (each image by its own statistics), or set data.intensity_scale to a number (e.g. "
            f"{max(groups):g}) to use the values as they are"
        )
    (scale,) = groups
    return scale


def value_range(images: Sequence[np.ndarray]) -> Tuple[float, float]:
    """``(min, max)`` over every pixel of ``images`` (0, 0 for none)."""
    images = [a for a in images if a.size]
    if not images:
        return 0.0, 0.0
    return float(min(a.min() for a in images)), float(max(a.max() for a in images))


def check_input_range(
    ranges: Dict[str, Tuple[float, float]], normalization: str, scale: float, trained: Sequence[float],
    record: str, accept: bool = False,
) -> None:
    """Refuse (ValueError naming the file) inputs whose values do not match what the model was trained on:
    values outside its range, or every value in [0, 1] for a model whose training images reached more (a
    rescaled copy predicts nearly black). ``ranges``: ``{file: (min, max)}``; ``trained``: the training
    images' ``[low, high]``; ``record``: the ``preprocessing.json`` the numbers come from. ``accept``: the
    user confirms such inputs; each mismatch is then a warning."""
    if normalization in ("zscore", "volume"):
        return  # per-image or per-volume statistics: the value range does not matter
    low, high = min(0.0, float(trained[0])), max(float(scale), float(trained[1]))
    mismatches = []
    bad = {f: r for f, r in ranges.items() if r[0] < low or r[1] > high}
    if bad:
        f, (lo, hi) = next(iter(bad.items()))
        mismatches.append(
            f"input {f!r} ({len(bad)} such) has values {lo:g}..{hi:g}, outside the range {low:g}..{high:g} the "
            f"model was trained on (intensity_scale {scale:g}, {record}); pixel values are used as stored, so "
            f"convert the image to the training data's bit depth and range, e.g. 8-bit for a model trained "
            f"on 8-bit images"
        )
    dark = [f for f, r in ranges.items() if r[1] <= 1 and r[1] > r[0]] if high > 2 else []
    if dark:
        mismatches.append(
            f"input {dark[0]!r} ({len(dark)} such) has every value in [0, 1] but the training images reached "
            f"{float(trained[1]):g} ({record}): a copy rescaled to [0, 1] predicts as a nearly black image; "
            f"give the original values (pixel values are used as stored)"
        )
    if mismatches and not accept:
        raise ValueError(mismatches[0] + "; if these values are what you mean, confirm with accept_intensity=True")
    for message in mismatches:
        logger.warning("%s (accepted)", message)
