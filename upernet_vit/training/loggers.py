"""Experiment loggers: TensorBoard or Weights & Biases, beside the run folder's metrics.csv and progress.png.

``train.logger: none | tensorboard | wandb``. Each validation epoch logs its ``metrics.csv`` row (losses,
learning rate, EMA Dice, per-class Dice and IoU) at step = epoch, and the validation overlays as images
when they are written. TensorBoard writes event files to ``<run>/tensorboard`` (works offline); W&B logs to
the project ``upernet-vit`` (``WANDB_MODE=offline`` keeps it local) and resumes the same W&B run after
``--resume``. Both are optional extras, imported only when chosen.
"""
from __future__ import annotations

import os
import uuid
from typing import Any, Dict, Mapping, Optional

import numpy as np

from ..runs.run_folder import TENSORBOARD_DIR, WANDB_ID_FILE

LOGGERS = ("none", "tensorboard", "wandb")


def _group(column: str) -> str:
    """``val_dice_disk`` -> ``val/dice_disk``, ``train_loss`` -> ``train/loss``: one chart group per phase."""
    for prefix in ("train_", "val_"):
        if column.startswith(prefix):
            return prefix[:-1] + "/" + column[len(prefix):]
    return "epoch/" + column


class RunLogger:
    """What the trainer calls; the base class logs nothing (``train.logger: none``)."""

    def log_epoch(self, epoch: int, row: Mapping[str, float]) -> None:
        """``row``: the epoch's ``metrics.csv`` row; NaN values (no validation this epoch) are skipped."""

    def log_images(self, epoch: int, images: Mapping[str, np.ndarray]) -> None:
        """``images``: name -> ``[H, W, 3]`` uint8."""

    def close(self) -> None:
        pass


class TensorBoardLogger(RunLogger):
    def __init__(self, run_dir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(
                "train.logger: tensorboard needs the tensorboard package: pip install -e \".[tensorboard]\" in the checkout"
            ) from err
        self.writer = SummaryWriter(log_dir=os.path.join(run_dir, TENSORBOARD_DIR))

    def log_epoch(self, epoch: int, row: Mapping[str, float]) -> None:
        for column, value in row.items():
            if column != "epoch" and np.isfinite(value):
                self.writer.add_scalar(_group(column), value, global_step=epoch)
        self.writer.flush()

    def log_images(self, epoch: int, images: Mapping[str, np.ndarray]) -> None:
        for name, image in images.items():
            self.writer.add_image(f"overlays/{name}", image, global_step=epoch, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger(RunLogger):
    def __init__(self, run_dir: str, config: Dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError as err:
            raise ImportError("train.logger: wandb needs the wandb package: pip install -e \".[wandb]\" in the checkout") from err
        self.wandb = wandb
        id_file = os.path.join(run_dir, WANDB_ID_FILE)
        if os.path.isfile(id_file):  # a resumed run continues its W&B run
            with open(id_file, encoding="utf-8") as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            with open(id_file, "w", encoding="utf-8") as f:
                f.write(run_id + "\n")
        self.run = wandb.init(project="upernet-vit", name=os.path.basename(os.path.abspath(run_dir)), id=run_id,
                              resume="allow", dir=run_dir, config=config)

    def log_epoch(self, epoch: int, row: Mapping[str, float]) -> None:
        values = {_group(c): v for c, v in row.items() if c != "epoch" and np.isfinite(v)}
        self.run.log(values, step=epoch)

    def log_images(self, epoch: int, images: Mapping[str, np.ndarray]) -> None:
        self.run.log({f"overlays/{name}": self.wandb.Image(image) for name, image in images.items()}, step=epoch)

    def close(self) -> None:
        self.run.finish()


def create_logger(kind: str, run_dir: str, config: Optional[Dict[str, Any]] = None) -> RunLogger:
    """The logger ``train.logger`` names; a missing package is an ImportError naming the extra."""
    if kind == "tensorboard":
        return TensorBoardLogger(run_dir)
    if kind == "wandb":
        return WandbLogger(run_dir, config or {})
    if kind == "none":
        return RunLogger()
    raise ValueError(f"train.logger {kind!r}: use one of {', '.join(LOGGERS)}")
