"""Built-in demo data: textured shapes of three classes on textured backgrounds, generated from a seed.

Class 1 = disks with fine speckle, 2 = rotated squares with stripes, 3 = triangles with a checker
texture, 0 = background (smooth blobs plus noise). Shapes overlap; later ones are drawn on top.
"""
from __future__ import annotations

import json
import os
from typing import List, Tuple

import numpy as np

from ..fileio import atomic_write, read_json, write_text
from .datasets import Case, DatasetInfo
from .image_io import write_label_png

DEMO_LABELS = {"background": 0, "disk": 1, "square": 2, "triangle": 3}
DEMO_NAME = "UperNetViTDemo"  # dataset.json's name: make-demo writes again only into its own dataset


def demo_info() -> DatasetInfo:
    return DatasetInfo(
        name="demo", label_names=list(DEMO_LABELS), label_values=list(DEMO_LABELS.values()), num_channels=1
    )


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    img = np.full(yy.shape, 0.35)
    for _ in range(4):  # smooth blobs: a few random low-frequency waves
        fy, fx = rng.uniform(0.5, 3.0, 2) * 2 * np.pi / size
        img += 0.06 * np.sin(fy * yy + fx * xx + rng.uniform(0, 2 * np.pi))
    return img + rng.normal(0, 0.05, yy.shape)


def demo_case(seed: int, size: int = 96, max_shapes: int = 4) -> Tuple[np.ndarray, np.ndarray]:
    """One ``([1, size, size] float32 image in [0, 1], [size, size] int64 label)`` pair."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    image = _background(rng, yy, xx, size)
    label = np.zeros((size, size), dtype=np.int64)
    for _ in range(rng.integers(1, max_shapes + 1)):
        cls = int(rng.integers(1, 4))
        r = rng.uniform(0.09, 0.2) * size
        cy, cx = rng.uniform(r * 0.5, size - r * 0.5, 2)
        angle = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        if cls == 1:
            mask = u**2 + v**2 < r**2
            fill = 0.75 + rng.normal(0, 0.08, yy.shape)
        elif cls == 2:
            side = r * 0.85
            mask = (np.abs(u) < side) & (np.abs(v) < side)
            fill = 0.6 + 0.15 * np.sin(u * 2 * np.pi / 5.0)
        else:
            # equilateral triangle: inside three half-planes at 120 degrees
            mask = np.ones_like(u, dtype=bool)
            for k in range(3):
                a = angle + k * 2 * np.pi / 3
                mask &= (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a) < r * 0.6
            fill = 0.85 - 0.2 * (((xx // 4) + (yy // 4)) % 2)
        image = np.where(mask, fill, image)
        label[mask] = cls
    image = np.clip(image + rng.normal(0, 0.03, yy.shape), 0.0, 1.0)
    return image[None].astype(np.float32), label


def demo_cases(num_cases: int, size: int = 96, seed: int = 0) -> List[Case]:
    """The demo cases as :func:`write_demo_dataset` stores them: 8-bit pixel values 0..255, so a model
    trained on ``data.format: demo`` predicts the written PNGs as it predicts these."""
    cases = []
    for i in range(num_cases):
        image, label = demo_case(seed * 100003 + i, size)
        cases.append(Case(f"demo_{i:03d}", _to_8bit(image).astype(np.float32), label, 255.0, f"demo_{i:03d}"))
    return cases


def _to_8bit(image: np.ndarray) -> np.ndarray:
    return np.round(image * 255).astype(np.int64)


def write_demo_dataset(root: str, num_train: int = 48, num_test: int = 8, size: int = 96, seed: int = 0) -> str:
    """Write the demo data as an nnU-Net v2 raw dataset (8-bit PNGs) with ``imagesTs``/``labelsTs``, into a
    new or empty folder or an earlier demo dataset (a FileExistsError for any other: never over a user's
    files)."""
    if os.path.isdir(root) and os.listdir(root) and not _is_demo(os.path.join(root, "dataset.json")):
        raise FileExistsError(
            f"{root!r} holds files and is not a demo dataset that make-demo wrote; it never writes among other "
            f"files: choose a new or empty folder"
        )
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for split, first, count in (("Tr", 0, num_train), ("Ts", num_train, num_test)):
        for i in range(first, first + count):
            image, label = demo_case(seed * 100003 + i, size)
            case = f"demo_{i:03d}"
            write_label_png(os.path.join(root, f"images{split}", f"{case}_0000.png"), _to_8bit(image[0]))
            write_label_png(os.path.join(root, f"labels{split}", f"{case}.png"), label)
    meta = {
        "channel_names": {"0": "gray"},
        "labels": DEMO_LABELS,
        "numTraining": num_train,
        "file_ending": ".png",
        "name": DEMO_NAME,
    }
    text = json.dumps(meta, indent=2)
    atomic_write(os.path.join(root, "dataset.json"), lambda p: write_text(p, text))
    return root


def _is_demo(path: str) -> bool:
    try:
        meta = read_json(path)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("name") == DEMO_NAME
