"""Sliding-window inference with Gaussian importance weighting (nnU-Net style) and mirror TTA."""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TTA_SCALES

# below this step each pixel is predicted more than 100 times (1/step^2) for no measurable gain; nnU-Net
# uses 0.5, MONAI's overlaps of 0.25-0.75 are steps of 0.75-0.25
MIN_STEP = 0.1


def gaussian_importance(size: Sequence[int], sigma_scale: float = 1.0 / 8) -> torch.Tensor:
    """``[h, w]`` weights peaking at the window centre (sigma = size/8), min clipped above 0."""
    axes = []
    for s in size:
        coords = torch.arange(s, dtype=torch.float64) - (s - 1) / 2
        sigma = max(s * sigma_scale, 1e-3)
        axes.append(torch.exp(-0.5 * (coords / sigma) ** 2))
    weights = torch.outer(axes[0], axes[1])
    weights = weights / weights.max()
    return weights.clamp_min(weights[weights > 0].min()).float()


def check_step(step: float) -> None:
    """The sliding-window step, a fraction of the patch: in [:data:`MIN_STEP`, 1]. Above 1 windows leave
    gaps (pixels with no prediction); 0 never advances."""
    if not (math.isfinite(step) and MIN_STEP <= step <= 1):
        raise ValueError(
            f"step={step}: the sliding-window step is a fraction of the patch in [{MIN_STEP}, 1] (above 1 the "
            f"windows leave pixels unpredicted; below {MIN_STEP} each pixel is predicted over "
            f"{round(1 / MIN_STEP ** 2)} times); the default 0.5 is nnU-Net's"
        )


def window_starts(size: int, window: int, step: float) -> List[int]:
    """Window offsets covering ``size`` with overlap ``1 - step`` (nnU-Net's ``compute_steps_for_sliding_window``)."""
    check_step(step)
    if size <= window:
        return [0]
    count = math.ceil((size - window) / (window * step)) + 1
    stride = (size - window) / (count - 1)
    return [int(round(stride * i)) for i in range(count)]


@torch.no_grad()
def sliding_window_logits(
    model: nn.Module,
    image: torch.Tensor,
    patch_size: Sequence[int],
    step: float = 0.5,
    mirror: bool = False,
    batch_size: int = 4,
    amp_dtype: Optional[torch.dtype] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> torch.Tensor:
    """``image [C, H, W]`` (normalized, on the model's device) -> logits ``[K, H, W]`` (float32).

    Windows of ``patch_size`` (smaller where the image is smaller: the model takes any size) at
    overlap ``1 - step``; each window's logits are weighted by a Gaussian and the sum divided by the
    summed weights. ``mirror=True`` averages over horizontal, vertical and both flips. ``progress(n)`` is
    called after each batch with the number of windows done (for a progress bar).
    """
    _, height, width = image.shape
    wh, ww = min(patch_size[0], height), min(patch_size[1], width)
    weights = gaussian_importance((wh, ww)).to(image.device)
    boxes: List[Tuple[int, int]] = [
        (top, left) for top in window_starts(height, wh, step) for left in window_starts(width, ww, step)
    ]
    out: Optional[torch.Tensor] = None
    norm = torch.zeros(height, width, device=image.device)
    autocast = (
        torch.autocast(device_type=image.device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    )
    flips: List[Tuple[int, ...]] = [()] + ([(3,), (2,), (2, 3)] if mirror else [])
    for start in range(0, len(boxes), batch_size):
        chunk = boxes[start : start + batch_size]
        batch = torch.stack([image[:, t : t + wh, l : l + ww] for t, l in chunk])
        logits = 0
        with autocast:
            for dims in flips:
                pred = model(batch.flip(dims) if dims else batch)
                logits = logits + (pred.flip(dims) if dims else pred).float()
        logits = logits / len(flips)
        if out is None:
            out = torch.zeros(logits.shape[1], height, width, device=image.device)
        for (t, l), window_logits in zip(chunk, logits):
            out[:, t : t + wh, l : l + ww] += window_logits * weights
            norm[t : t + wh, l : l + ww] += weights
        if progress is not None:
            progress(len(chunk))
    assert out is not None
    return out / norm


def check_scales(scales: Sequence[float]) -> None:
    """TTA scale factors: one or more, each in ``config.TTA_SCALES`` ([0.25, 4])."""
    low, high = TTA_SCALES
    if not scales or any(not (math.isfinite(s) and low <= s <= high) for s in scales):
        raise ValueError(
            f"scales=[{', '.join(f'{s:g}' for s in scales)}]: give one or more factors in [{low:g}, {high:g}], "
            f"e.g. scales=[0.75, 1, 1.25] (factors, not percent)"
        )


def window_count(height: int, width: int, patch_size: Optional[Sequence[int]], scales: Sequence[float],
                 step: float) -> int:
    """How many windows :func:`tta_probabilities` predicts for an ``height x width`` image (each once per
    flip with ``mirror``)."""
    total = 0
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        window = patch_size or size
        total += len(window_starts(size[0], min(window[0], size[0]), step)) * len(
            window_starts(size[1], min(window[1], size[1]), step))
    return total


@torch.no_grad()
def tta_probabilities(
    model: nn.Module,
    image: torch.Tensor,
    patch_size: Optional[Sequence[int]],
    scales: Sequence[float] = (1.0,),
    step: float = 0.5,
    mirror: bool = False,
    amp_dtype: Optional[torch.dtype] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> torch.Tensor:
    """``image [C, H, W]`` -> class probabilities ``[K, H, W]``, averaged over ``scales`` (multi-scale TTA,
    the "+ms" protocol of DINOv2's and mmsegmentation's results).

    Per scale: resize the image (bilinear, antialiased when shrinking), :func:`sliding_window_logits` with
    ``patch_size`` (None: the whole image), softmax, resize the probabilities back to ``H, W``. Scale 1.0
    alone is the plain prediction. ``progress``: as in :func:`sliding_window_logits`."""
    check_scales(scales)  # the step: window_starts checks it
    height, width = image.shape[-2:]
    total: Optional[torch.Tensor] = None
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        scaled = image if size == (height, width) else F.interpolate(
            image[None], size=size, mode="bilinear", align_corners=False, antialias=scale < 1
        )[0]
        logits = sliding_window_logits(model, scaled, patch_size or size, step=step, mirror=mirror,
                                       amp_dtype=amp_dtype, progress=progress)
        probs = logits.softmax(0)
        if size != (height, width):
            probs = F.interpolate(probs[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        total = probs if total is None else total + probs
    assert total is not None
    return total / len(scales)
