"""progress.png (loss and Dice curves) and validation overlays, with matplotlib's Agg backend."""
from __future__ import annotations

import os
from typing import Dict, List, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_progress(history: Sequence[Dict[str, float]], path: str) -> None:
    """Train/val loss (left axis) and mean foreground Dice with its EMA (right axis) per epoch."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(epochs, [h["train_loss"] for h in history], label="train loss", color="tab:blue")
    ax.plot(epochs, [h["val_loss"] for h in history], label="val loss", color="tab:red")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h["val_dice_mean"] for h in history], "g.", label="val Dice (fg mean)")
    ax2.plot(epochs, [h["ema_dice"] for h in history], "g-", label="EMA Dice")
    ax2.set_ylabel("Dice")
    ax2.set_ylim(0, 1)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    fig.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower center", ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def save_overlay(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, num_classes: int, path: str, title: str = "") -> None:
    """Three panels: image (first channel or RGB), ground truth, prediction, with one colour per class."""
    plt = _pyplot()
    shown = image.transpose(1, 2, 0) if image.shape[0] == 3 else image[0]
    cmap = plt.get_cmap("tab10", max(num_classes, 2))
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
    panels: List = [("image", None), ("ground truth", truth), ("prediction", pred)]
    for ax, (name, labels) in zip(axes, panels):
        ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None)
        if labels is not None:
            masked = np.ma.masked_where(labels <= 0, labels)
            ax.imshow(masked, cmap=cmap, vmin=0, vmax=max(num_classes - 1, 1), alpha=0.5, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
