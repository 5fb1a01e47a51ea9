"""Joint image/mask augmentation (torchvision.transforms.v2) and the seeded patch datasets.

Every sample is a pure function of (seed, epoch, index): the same run gives the same batches in any
number of worker processes, and a resumed run continues with exactly the batches it would have seen.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ..config import AugmentationConfig
from .datasets import IGNORE_INDEX, Case
from .normalization import Normalizer


class RandomScaledCrop(v2.Transform):
    """Crop a ``patch / zoom`` window at a random position (partly outside the image if the image is
    small) and resize it to ``patch``. Outside pixels: image 0, mask ``IGNORE_INDEX``."""

    def __init__(self, patch_size: Sequence[int], scale_range: Tuple[float, float] = (1.0, 1.0)) -> None:
        super().__init__()
        self.patch_size = [int(s) for s in patch_size]
        self.scale_range = scale_range

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        zoom = float(torch.empty(1).uniform_(*self.scale_range))
        ch, cw = (max(1, round(p / zoom)) for p in self.patch_size)
        # window start: anywhere that keeps the window on the image, or centred slack if it is larger
        top = int(torch.randint(min(0, height - ch), max(0, height - ch) + 1, ()))
        left = int(torch.randint(min(0, width - cw), max(0, width - cw) + 1, ()))
        return dict(top=top, left=left, height=ch, width=cw)

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        top, left, ch, cw = params["top"], params["left"], params["height"], params["width"]
        height, width = inpt.shape[-2:]
        pad = [max(0, -left), max(0, -top), max(0, left + cw - width), max(0, top + ch - height)]
        is_mask = isinstance(inpt, tv_tensors.Mask)
        if any(pad):
            inpt = TF.pad(inpt, pad, fill=IGNORE_INDEX if is_mask else 0.0)
        interp = v2.InterpolationMode.NEAREST if is_mask else v2.InterpolationMode.BILINEAR
        return TF.resized_crop(
            inpt, top + pad[1], left + pad[0], ch, cw, self.patch_size, interpolation=interp, antialias=True
        )


class RandomIntensity(v2.Transform):
    """Contrast (x0.75-1.25 around the mean), brightness (x0.8-1.2), gamma (0.7-1.5, on the image
    rescaled to [0, 1] and back, as nnU-Net does) and Gaussian noise (up to 3% of the image's std), on
    images only, any channel count, any value range (values as stored or z-scored): each step commutes
    with the preset normalization's division by the intensity scale."""

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        u = torch.rand(4)
        return dict(
            brightness=0.8 + 0.4 * float(u[0]),
            contrast=0.75 + 0.5 * float(u[1]),
            gamma=0.7 + 0.8 * float(u[2]),
            noise=0.03 * float(u[3]),
        )

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        x = inpt.as_subclass(torch.Tensor)
        mean = x.mean(dim=(-2, -1), keepdim=True)
        x = ((x - mean) * params["contrast"] + mean) * params["brightness"]
        low, high = x.amin(dim=(-2, -1), keepdim=True), x.amax(dim=(-2, -1), keepdim=True)
        span = (high - low).clamp_min(1e-8)
        x = ((x - low) / span) ** params["gamma"] * span + low
        x = x + params["noise"] * x.std() * torch.randn_like(x)
        return tv_tensors.wrap(x, like=inpt)


def build_transform(patch_size: Sequence[int], cfg: Optional[AugmentationConfig]) -> v2.Transform:
    """Training augmentation (``cfg`` given) or a plain random crop at scale 1 (``cfg=None``)."""
    if cfg is None:
        return RandomScaledCrop(patch_size)
    steps: List[v2.Transform] = []
    if cfg.rotation_degrees:
        # the whole image first, so only its own corners (not every patch's) come from outside;
        # bilinear for the image, nearest for the mask (v2 picks that by type)
        steps.append(
            v2.RandomRotation(
                cfg.rotation_degrees, interpolation=v2.InterpolationMode.BILINEAR,
                fill={tv_tensors.Image: 0.0, tv_tensors.Mask: IGNORE_INDEX},
            )
        )
    steps.append(RandomScaledCrop(patch_size, tuple(cfg.scale_range)))  # type: ignore[arg-type]
    if cfg.flip:
        steps += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    if cfg.intensity:
        steps.append(RandomIntensity())
    return v2.Compose(steps)


class PatchDataset(torch.utils.data.Dataset):
    """``length`` patches per epoch; item i picks a case (a ``foreground_fraction`` of them among the cases
    holding foreground) and augments it with RNG seeded by (seed, epoch, i). Returns ``(image [C, *patch] float32 normalized, label [*patch] int64)``.

    Z-score normalization uses each whole image's statistics (as validation and prediction do) and
    runs before augmentation; the per-channel preset normalization runs after it."""

    def __init__(
        self,
        cases: Sequence[Case],
        patch_size: Sequence[int],
        normalizer: Normalizer,
        length: int,
        seed: int,
        augment: Optional[AugmentationConfig],
        foreground_fraction: float = 0.0,
    ) -> None:
        if not cases:
            raise ValueError("PatchDataset needs at least one case")
        self.normalizer = normalizer
        self.per_image = normalizer.mode == "zscore"
        self.cases = list(cases)  # each read when a sample needs it (from the data cache's map, or memory)
        # nnU-Net's foreground oversampling, for volumes' slices (most CT slices hold background only): this
        # share of the samples comes from the cases that hold a foreground class
        self.foreground = [c for c in self.cases if any(i > 0 for i in c.present_classes())]
        self.foreground_fraction = foreground_fraction if self.foreground else 0.0
        self.transform = build_transform(patch_size, augment)
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.foreground_fraction and rng.random() < self.foreground_fraction:
            case = self.foreground[int(rng.integers(len(self.foreground)))]
        else:
            case = self.cases[int(rng.integers(len(self.cases)))]
        pixels = torch.from_numpy(case.pixels())
        if self.per_image:  # z-score with the whole image's statistics, before augmentation
            pixels = self.normalizer(pixels)
        with torch.random.fork_rng(devices=[]):  # the CPU generator only: CUDA's stays the trainer's
            torch.default_generator.manual_seed(int(rng.integers(2**31)))
            image, label = self.transform(tv_tensors.Image(pixels), tv_tensors.Mask(torch.from_numpy(case.classes())))
        image = image.as_subclass(torch.Tensor)
        return (image if self.per_image else self.normalizer(image)), label.as_subclass(torch.Tensor)
