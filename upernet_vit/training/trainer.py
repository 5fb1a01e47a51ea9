"""Training loop: seeded patches, Dice+CE, AdamW/SGD with warmup-poly, AMP, validation, checkpoints, resume, DDP."""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from ..config import Config, DataConfig, config_to_yaml, load_config, save_config
from ..fileio import atomic_write, save_torch
from ..pretrained import WEIGHTS_NAME, non_finite_tensors, verify_checksum
from ..model import UperNetViT
from .augment import AugmentConfig, Normalizer, PatchDataset
from .checkpoints import (
    BEST, LATEST, STATE_NAME, RunLock, copy_checkpoint, latest_checkpoint, recover_run_folder, repair_best,
    write_folder_atomically,
)
from .data import Case, DatasetInfo, absent_classes, fold_case_ids, load_folders, load_nnunet_raw
from .demo_data import demo_cases, demo_info
from .distributed import all_reduce_sum, barrier, cleanup, init_distributed, resolve_device
from .intensity import choose_intensity_scale, value_range
from .inference import amp_dtype, tta_probabilities
from .loggers import RunLogger, create_logger
from .losses import DiceCELoss, inverse_frequency_weights, segmentation_loss
from .metrics import confusion_counts, summarize
from .optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)

# upernet_vit.fast.optimize flags for training, chosen by measurement (README, Performance): recomputing
# the upsampled levels saves memory on any device at no measured cost; channels_last made the head's
# training step 1.46x slower on an AMD EPYC; Winograd helps on some CPUs and hurts on others (opt-in:
# upernet-vit train --winograd)
TRAIN_FAST_PATHS: Mapping[str, bool] = MappingProxyType({"channels_last": False, "recompute_upsampled": True})


@dataclass
class PreparedData:
    info: DatasetInfo
    train_cases: List[Case]
    val_cases: List[Case]
    splits: List[Dict[str, List[str]]]
    intensity_scale: float  # pixel values / this -> [0, 1] for the preset normalization (training/intensity.py)
    intensity_range: List[float]  # [min, max] pixel value of the dataset's images
    absent: List[int]  # class indices that no training mask contains (left out of the mean Dice)


def prepare_data(cfg: DataConfig) -> PreparedData:
    """Load and check the dataset, pick the fold's cases and the intensity scale. Every data error
    surfaces here; a declared class that no training mask contains is a warning."""
    if cfg.format == "demo":  # the same images whatever train.seed is
        info, cases = demo_info(), demo_cases(cfg.demo_cases, cfg.demo_image_size)
        splits_file = None
    else:
        if not cfg.root:
            raise ValueError(f"data.root is not set: data.format {cfg.format!r} needs the dataset folder")
        if cfg.format == "nnunet":
            info, cases = load_nnunet_raw(cfg.root)
        else:
            info, cases = load_folders(cfg.root, cfg.labels)
        splits_file = cfg.splits_file or os.path.join(cfg.root, "splits_final.json")
    if info.num_classes < 2:
        raise ValueError(f"the dataset has {info.num_classes} label(s); segmentation needs background plus at least one class")
    fold = str(cfg.fold)
    train_ids, val_ids, splits = fold_case_ids(
        [c.case_id for c in cases], fold, splits_file, cfg.num_folds, required=bool(cfg.splits_file)
    )
    by_id = {c.case_id: c for c in cases}
    train_cases = [by_id[i] for i in train_ids]
    scale = choose_intensity_scale({c.source or c.case_id: c.full_scale for c in cases}, cfg.normalization,
                                   cfg.intensity_scale)
    absent = absent_classes(info, train_cases)
    if absent:
        logger.warning(
            "class(es) %s are declared (%s) but no training mask of fold %s contains them: the model cannot "
            "learn them, and they are left out of the mean validation Dice",
            ", ".join(f"{info.label_names[i]!r} (value {info.label_values[i]})" for i in absent),
            "data.labels" if cfg.labels else ("dataset.json" if cfg.format == "nnunet" else "the dataset"), fold,
        )
    low, high = value_range([c.image for c in cases])
    return PreparedData(info, train_cases, [by_id[i] for i in val_ids], splits, scale, [low, high], absent)


# keys that may differ between a run and its --resume (they do not change what is computed)
_RESUME_FREE_KEYS = {"data.num_workers", "train.device", "train.output_dir", "train.num_overlays", "train.logger"}


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and key != "backbone_kwargs":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the run stops and saves nothing more."""


def _write_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)


class Trainer:
    """Runs one training job from a :class:`Config` into ``output_dir``.

    The run folder gets ``config.yaml``, ``splits_final.json``, ``metrics.csv``, ``progress.png``,
    ``overlays/`` and ``checkpoint_latest/``, ``checkpoint_best/`` (``save_pretrained`` files plus
    ``preprocessing.json`` and ``training_state.pt``). ``resume=True`` continues from the latest
    checkpoint with the same optimizer, scheduler, scaler, RNG state and history. ``fast``: flags for
    :func:`upernet_vit.fast.optimize` over :data:`TRAIN_FAST_PATHS` (``None``: the reference model as built).
    """

    def __init__(
        self, config: Config, output_dir: str, resume: bool = False,
        fast: Optional[Mapping[str, bool]] = MappingProxyType({}),
    ) -> None:
        self.cfg = config
        self.output_dir = output_dir
        tcfg = config.train
        self.dist = init_distributed(resolve_device(tcfg.device).type)
        self.device = resolve_device(tcfg.device, self.dist.local_rank if self.dist.enabled else None)
        self.amp_dtype = amp_dtype(tcfg.amp, self.device)  # fails early for fp16 without CUDA
        if config.data.batch_size % self.dist.world_size:
            raise ValueError(
                f"data.batch_size {config.data.batch_size} is not divisible by the {self.dist.world_size} processes"
            )

        self.data = prepare_data(config.data)
        info = self.data.info
        if config.model.num_classes is not None and config.model.num_classes != info.num_classes:
            raise ValueError(
                f"model.num_classes is {config.model.num_classes} but the dataset has {info.num_classes} labels "
                f"{info.label_names}; remove model.num_classes or make it match"
            )
        torch.manual_seed(tcfg.seed)
        self.model = UperNetViT.from_config(config, num_classes=info.num_classes, in_chans=info.num_channels)
        if fast is not None:
            from ..fast import optimize

            optimize(self.model, **{**TRAIN_FAST_PATHS, **fast})
        self.patch_size = list(config.data.patch_size)
        if len(self.patch_size) != 2 or min(self.patch_size) < self.model.patch_size:
            raise ValueError(
                f"data.patch_size {self.patch_size} must be 2 sizes, each >= the backbone patch "
                f"({self.model.patch_size} px for {self.model.backbone.name})"
            )
        if config.model.decoder.norm == "batchnorm" and self.dist.enabled and self.device.type == "cuda":
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model.to(self.device)
        self.normalizer = Normalizer(self.model.mean, self.model.std, config.data.normalization,
                                     self.data.intensity_scale)
        self.model.preprocessing = self._preprocessing()  # save_pretrained writes it with the weights

        self.optimizer = build_optimizer(self.model, tcfg, self.model.backbone.depth)
        self.scheduler = build_scheduler(self.optimizer, tcfg)
        self.scaler = torch.amp.GradScaler("cuda", enabled=tcfg.amp == "fp16")
        self.criterion = DiceCELoss(class_weights=self._class_weights()).to(self.device)
        self.net: nn.Module = (
            DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.dist.enabled
            else self.model
        )

        aug = config.data.augmentation
        augment = AugmentConfig(tuple(aug.scale_range), aug.rotation_degrees, aug.flip, aug.intensity)  # type: ignore[arg-type]
        self.train_set = PatchDataset(
            self.data.train_cases, self.patch_size, self.normalizer,
            tcfg.num_iterations_per_epoch * config.data.batch_size, tcfg.seed, augment,
        )
        self.val_set = PatchDataset(
            self.data.val_cases, self.patch_size, self.normalizer,
            tcfg.num_val_iterations_per_epoch * config.data.batch_size, tcfg.seed + 1, None,
        )
        self.start_epoch = 0
        self.history: List[Dict[str, float]] = []
        self.best_ema = -math.inf
        self.best_epoch: Optional[int] = None  # the epoch checkpoint_best holds
        self.ema: Optional[float] = None
        self.lock: Optional[RunLock] = None
        self.run_logger = RunLogger()  # the main process's replaces it (train.logger)
        self.overlay_paths: List[str] = []  # written by the last validate(write_overlays=True)
        if self.dist.is_main:
            os.makedirs(output_dir, exist_ok=True)
            self.lock = RunLock(output_dir)  # before touching any file of the run
        try:
            self._open_run(resume)
        except BaseException:
            self.release()
            raise

    def _open_run(self, resume: bool) -> None:
        if self.dist.is_main:
            if not resume and latest_checkpoint(self.output_dir):
                raise FileExistsError(
                    f"{self.output_dir} already holds a run (checkpoint_latest); pass --resume to continue it "
                    f"or choose another --output"
                )
            recover_run_folder(self.output_dir)
        barrier(self.dist)
        if resume:
            self._resume()
        if self.dist.is_main:
            self._write_run_files()
            self.run_logger = create_logger(self.cfg.train.logger, self.output_dir, self.cfg.to_dict())

    def release(self) -> None:
        """Close the logger and give up the run folder's lock (``run`` does at its end; a Trainer that is not
        run can call it)."""
        self.run_logger.close()
        self.run_logger = RunLogger()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _class_weights(self) -> Optional[List[float]]:
        """``train.class_weights`` checked against the dataset's classes, or computed (``auto``)."""
        wanted, info = self.cfg.train.class_weights, self.data.info
        if wanted is None:
            return None
        if wanted == "auto":
            labels = [torch.from_numpy(c.label) for c in self.data.train_cases]
            weights = inverse_frequency_weights(labels, info.num_classes)
            logger.info("train.class_weights auto (inverse pixel frequency of the training cases): %s",
                        ", ".join(f"{n} {w:.3g}" for n, w in zip(info.label_names, weights)))
            return weights
        if len(wanted) != info.num_classes:
            raise ValueError(
                f"train.class_weights has {len(wanted)} values but the dataset has {info.num_classes} classes "
                f"{info.label_names} (background included): give one weight per class"
            )
        return list(wanted)

    # ------------------------------------------------------------------ files
    def _preprocessing(self) -> Dict[str, Any]:
        info = self.data.info
        return {
            "label_names": info.label_names,
            "label_values": info.label_values,
            "num_channels": info.num_channels,
            "file_ending": info.file_ending,
            "normalization": self.cfg.data.normalization,
            "mean": list(self.normalizer.mean.flatten().tolist()),
            "std": list(self.normalizer.std.flatten().tolist()),
            "intensity_scale": self.data.intensity_scale,
            "intensity_range": self.data.intensity_range,
            "patch_size": self.patch_size,
        }

    def _write_run_files(self) -> None:
        atomic_write(os.path.join(self.output_dir, "config.yaml"), lambda p: save_config(self.cfg, p))
        atomic_write(os.path.join(self.output_dir, "splits_final.json"), lambda p: _write_json(p, self.data.splits))

    def _check_weights_finite(self, next_epoch: int) -> None:
        """A NaN model is never written, never as best (on every DDP process: the weights are the same)."""
        bad = non_finite_tensors(self.model.state_dict())
        if bad:
            raise TrainingDiverged(
                f"training stopped: after epoch {next_epoch} {len(bad)} weight tensor(s) hold NaN or infinity "
                f"(e.g. {bad[0]}); {LATEST} is not written and keeps its previous epoch"
            )

    def _save_checkpoint(self, name: str, next_epoch: int) -> None:
        state = {
            "epoch": next_epoch,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "history": self.history,
            "best_ema": self.best_ema,
            "best_epoch": self.best_epoch,
            "ema": self.ema,
            "config": config_to_yaml(self.cfg),
        }

        def write(folder: str) -> None:
            self.model.save_pretrained(folder)  # with preprocessing.json
            save_torch(state, os.path.join(folder, STATE_NAME))

        write_folder_atomically(os.path.join(self.output_dir, name), write)

    def _resume(self) -> None:
        path = latest_checkpoint(self.output_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no {LATEST} with {STATE_NAME} in {self.output_dir}")
        state = torch.load(os.path.join(path, STATE_NAME), map_location="cpu", weights_only=True)
        # the config first: a changed architecture is reported as such, not as a load_state_dict traceback
        saved, now = _flatten(load_config(yaml.safe_load(state["config"])).to_dict()), _flatten(self.cfg.to_dict())
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in _RESUME_FREE_KEYS)
        if changed:
            raise ValueError(
                f"--resume: the config differs from the run in {self.output_dir} in "
                + ", ".join(f"{k} ({saved.get(k)!r} -> {now.get(k)!r})" for k in changed)
                + "; resume with the run's own config.yaml, or start a new run with another --output"
            )
        from safetensors.torch import load_file

        verify_checksum(path)
        weights = os.path.join(path, WEIGHTS_NAME)
        try:
            self.model.load_state_dict(load_file(weights, device=str(self.device)))
        except Exception as err:
            raise ValueError(f"--resume: cannot load {weights} into the model: {str(err).strip().splitlines()[0]}") from err
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_torch"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.start_epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.best_ema = float(state["best_ema"])
        self.ema = state["ema"]
        # runs saved before best_epoch was recorded: the last epoch whose EMA was the best
        self.best_epoch = state.get("best_epoch", next(
            (int(row["epoch"]) for row in reversed(self.history) if row["ema_dice"] == self.best_ema), None
        ))
        if self.dist.is_main:
            repair_best(self.output_dir, self.best_epoch, self.start_epoch)
            if self.history:  # a kill between the checkpoint and metrics.csv left the csv a row behind
                self._write_metrics()
        logger.info("resumed %s at epoch %d", path, self.start_epoch)

    def _write_metrics(self) -> None:
        path = os.path.join(self.output_dir, "metrics.csv")
        columns = list(self.history[0])

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(self.history)

        atomic_write(path, write)
        from .plots import plot_progress

        plot_progress(self.history, os.path.join(self.output_dir, "progress.png"))

    # ------------------------------------------------------------------ loops
    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _loader(self, dataset: PatchDataset, epoch: int) -> DataLoader:
        dataset.set_epoch(epoch)
        sampler = (
            DistributedSampler(dataset, self.dist.world_size, self.dist.rank, shuffle=False)
            if self.dist.enabled
            else None
        )
        return DataLoader(
            dataset,
            batch_size=self.cfg.data.batch_size // self.dist.world_size,
            sampler=sampler,
            num_workers=self.cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def _loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            if self.model.config.decoder.aux_head:
                logits, aux = self.net(images, return_aux=True)
                return segmentation_loss(self.criterion, logits, labels, aux, self.cfg.train.aux_weight)
            return segmentation_loss(self.criterion, self.net(images), labels)

    def train_epoch(self, epoch: int) -> float:
        from tqdm.auto import tqdm

        self.net.train()
        total, count, seen, start = 0.0, 0, 0, time.perf_counter()
        clip = self.cfg.train.gradient_clip
        params = [p for p in self.model.parameters() if p.requires_grad]
        bar = tqdm(
            self._loader(self.train_set, epoch),
            desc=f"epoch {epoch + 1}/{self.cfg.train.num_epochs}",
            disable=not self.dist.is_main or None,
            leave=False,
            unit="it",
        )
        fp16 = self.scaler.is_enabled()
        skipped = 0
        for step, (images, labels) in enumerate(bar):
            images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._loss(images, labels)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # a no-op without fp16
            # the norm is needed for the finiteness check even when clipping is off (max_norm inf clips nothing)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip or math.inf)
            finite = bool(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))
            if not finite and fp16:  # fp16 overflow: the GradScaler skips this step and lowers its scale
                skipped += 1
            elif not finite:
                raise TrainingDiverged(self._divergence_message(epoch, step, float(loss.detach()), float(grad_norm)))
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if finite:
                self.scheduler.step()
            else:  # the schedule advances past a skipped step on purpose; torch would warn of a misuse
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
                    self.scheduler.step()
            if finite:
                total += float(loss.detach())
                count += 1
            seen += images.shape[0] * self.dist.world_size
            bar.set_postfix(loss=f"{total / max(count, 1):.4f}", img_s=f"{seen / (time.perf_counter() - start):.1f}")
        if skipped:
            logger.warning("epoch %d: the fp16 GradScaler skipped %d of %d steps with non-finite gradients",
                           epoch + 1, skipped, skipped + count)
            if not count:
                raise TrainingDiverged(self._divergence_message(epoch, skipped - 1, math.nan, math.nan))
        stats = all_reduce_sum(torch.tensor([total, count], dtype=torch.float64), self.dist)
        return float(stats[0] / max(stats[1], 1))

    def _log_to_run_logger(self, epoch: int, row: Dict[str, float]) -> None:
        self.run_logger.log_epoch(epoch, row)
        if self.overlay_paths:
            from PIL import Image

            images = {}
            for path in self.overlay_paths:
                with Image.open(path) as image:
                    images[os.path.splitext(os.path.basename(path))[0]] = np.asarray(image.convert("RGB"))
            self.run_logger.log_images(epoch, images)
            self.overlay_paths = []

    def _divergence_message(self, epoch: int, step: int, loss: float, grad_norm: float) -> str:
        last = latest_checkpoint(self.output_dir)  # written after each epoch: it holds `epoch` epochs
        kept = f"{last} (epoch {epoch})" if last else "no checkpoint yet"
        return (
            f"training stopped: non-finite loss {loss} / gradient norm {grad_norm} at epoch {epoch + 1}, "
            f"iteration {step + 1}; nothing from this epoch is saved (kept: {kept}). Likely causes: a learning "
            f"rate too high (train.initial_lr {self.cfg.train.initial_lr}), fp16 overflow (train.amp "
            f"{self.cfg.train.amp!r}: try bf16), or no gradient clipping (train.gradient_clip "
            f"{self.cfg.train.gradient_clip}); start a new run with a lower train.initial_lr"
        )

    @torch.no_grad()
    def val_loss(self, epoch: int) -> float:
        if not len(self.val_set):
            return float("nan")
        self.net.eval()
        total, count = 0.0, 0
        for images, labels in self._loader(self.val_set, epoch):
            total += float(self._loss(images.to(self.device), labels.to(self.device)))
            count += 1
        stats = all_reduce_sum(torch.tensor([total, count], dtype=torch.float64), self.dist)
        return float(stats[0] / max(stats[1], 1))

    @torch.no_grad()
    def validate(self, write_overlays: bool = False) -> Dict[str, float]:
        """Whole-image sliding-window Dice/IoU on this fold's validation cases (split across processes)."""
        self.model.eval()
        info = self.data.info
        counts = torch.zeros(info.num_classes, 3, dtype=torch.int64)
        self.overlay_paths = []
        mine = self.data.val_cases[self.dist.rank :: self.dist.world_size]
        for i, case in enumerate(mine):
            image = self.normalizer(torch.from_numpy(case.image)).to(self.device)
            probs = tta_probabilities(
                self.model, image, self.patch_size, self.cfg.train.val_scales, mirror=self.cfg.train.val_mirror,
                amp_dtype=self.amp_dtype,
            )
            pred = probs.argmax(0).cpu()
            counts += confusion_counts(pred, torch.from_numpy(case.label), info.num_classes)
            if write_overlays and self.dist.is_main and i < self.cfg.train.num_overlays:
                from .plots import save_overlay

                folder = os.path.join(self.output_dir, "overlays")
                os.makedirs(folder, exist_ok=True)
                path = os.path.join(folder, f"{case.case_id}.png")
                save_overlay(case.image, case.label, pred.numpy(), info.num_classes, path, title=case.case_id)
                self.overlay_paths.append(path)
        counts = all_reduce_sum(counts, self.dist)
        return summarize(counts, info.label_names, exclude=self.data.absent)

    def run(self) -> List[Dict[str, float]]:
        """Train from ``start_epoch`` to ``num_epochs``; returns the per-epoch history."""
        tcfg = self.cfg.train
        last = tcfg.num_epochs - 1
        try:
            for epoch in range(self.start_epoch, tcfg.num_epochs):
                start = time.perf_counter()
                lr = max(g["lr"] for g in self.optimizer.param_groups)  # the decoder's (layer decay scales the rest)
                train_loss = self.train_epoch(epoch)
                val_loss = self.val_loss(epoch)
                validate = (epoch + 1) % tcfg.val_every == 0 or epoch == last
                metrics = self.validate(write_overlays=epoch == last) if validate else {}
                dice = metrics.get("dice_mean", float("nan"))
                if not math.isnan(dice):
                    self.ema = dice if self.ema is None else 0.9 * self.ema + 0.1 * dice
                row: Dict[str, float] = {
                    "epoch": epoch + 1,
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "val_dice_mean": dice,
                    "val_iou_mean": metrics.get("iou_mean", float("nan")),
                    "ema_dice": self.ema if self.ema is not None else float("nan"),
                    "lr": lr,
                    "epoch_time_s": time.perf_counter() - start,
                }
                for name in self.data.info.label_names:
                    row[f"val_dice_{name}"] = metrics.get(f"dice_{name}", float("nan"))
                for name in self.data.info.label_names:
                    row[f"val_iou_{name}"] = metrics.get(f"iou_{name}", float("nan"))
                self.history.append(row)
                improved = self.ema is not None and self.ema > self.best_ema
                if improved:
                    self.best_ema, self.best_epoch = float(self.ema), epoch + 1
                self._check_weights_finite(epoch + 1)
                if self.dist.is_main:
                    # the state records best_epoch before checkpoint_best is written: a crash in between
                    # is repaired at --resume (checkpoints.repair_best); metrics.csv comes after the
                    # checkpoint, so it never shows an epoch that no checkpoint holds (a crash before it is
                    # mended at --resume from the checkpoint's history)
                    self._save_checkpoint(LATEST, epoch + 1)
                    if improved:
                        copy_checkpoint(os.path.join(self.output_dir, LATEST), os.path.join(self.output_dir, BEST))
                    self._write_metrics()
                    self._log_to_run_logger(epoch + 1, row)
                    logger.info(
                        "epoch %d/%d  train_loss %.4f  val_loss %.4f  val_dice %.4f  ema_dice %.4f%s  lr %.2e  %.1f s",
                        epoch + 1, tcfg.num_epochs, train_loss, val_loss, dice, row["ema_dice"],
                        " (best)" if improved else "", lr, row["epoch_time_s"],
                    )
                barrier(self.dist)
        finally:
            cleanup(self.dist)
            self.release()
        return self.history
