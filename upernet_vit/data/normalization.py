"""Input normalization: pixel values as stored -> what the backbone expects.

    preset   (x / intensity_scale - mean) / std per channel (the backbone's pretraining statistics, which
             expect [0, 1]; intensity_scale is the recorded full scale of the training images)
    zscore   (x - mean(x)) / std(x) per image and channel (nnU-Net's default for non-CT data; scale-free)
    volume   nothing here: a volume's slices come z-scored with the whole volume's channel statistics
             (datasets.VolumeSlice, and predict for volume inputs)
"""
from __future__ import annotations

from typing import Sequence

import torch


class Normalizer:
    """``[C, H, W]`` pixel values as stored -> normalized: ``(x / scale - mean) / std`` per channel (the
    backbone's pretraining stats, which expect [0, 1]; ``scale`` is the recorded ``intensity_scale``), or
    per-image z-score (``mode="zscore"``, as nnU-Net for non-CT data; scale-free)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], mode: str = "preset", scale: float = 1.0) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.mode = mode
        self.scale = float(scale)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "volume":
            return x
        if self.mode == "zscore":
            m = x.mean(dim=(-2, -1), keepdim=True)
            s = x.std(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
            return (x - m) / s
        return (x / self.scale - self.mean.to(x.device)) / self.std.to(x.device)
