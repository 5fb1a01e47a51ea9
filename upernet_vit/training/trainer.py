"""The training loop: an epoch of seeded, augmented patches (Dice + CE, AdamW/SGD with warmup-poly,
AMP, gradient clipping), a validation of whole images by sliding window, and ``run``, which chains them and
hands each epoch to the run folder.

What it builds on, one file each: the data (``data/prepare.py``), the run folder with its checkpoints and
metrics rows (``runs/run_folder.py``), how the processes share the work (``strategies.py``: one process,
DDP or FSDP), the precision (``precision.py``), the loss (``losses.py``), the optimizer and schedule
(``optim.py``), sliding-window inference (``inference/sliding_window.py``).

Under torchrun (``WORLD_SIZE`` > 1) each process trains on its part of the global batch; whatever the
strategy, the run folder is the same: rank 0 writes the full weights and a one-process optimizer state.
"""
from __future__ import annotations

import logging
import math
import os
import time
import warnings
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..config import Config, check_training_storage
from ..model import UperNetViT
from ..pretrained import non_finite_tensors
from ..data.augment import PatchDataset
from ..data.datasets import Case
from ..data.normalization import Normalizer
from ..data.cache import DEFAULT_CACHE_NAME
from ..data.prepare import PreparedData, prepare_data
from ..devices import resolve_device
from ..inference.metrics import confusion_counts, summarize
from ..inference.sliding_window import tta_probabilities
from ..precision import Precision
from ..runs.checkpoints import LATEST
from ..runs.outputs import refuse_overlap
from ..runs.record import ModelRecord
from ..runs.run_folder import RunFolder
from .loggers import RunLogger, create_logger
from .losses import DiceCELoss, class_weights, segmentation_loss
from .optim import build_optimizer, build_scheduler
from .strategies import create_strategy

logger = logging.getLogger(__name__)


FOREGROUND_FRACTION = 1 / 3  # of a volume dataset's samples, from slices with foreground (nnU-Net's share)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the run stops and saves nothing more."""


class Trainer:
    """Runs one training job from a :class:`Config` into the run folder ``output_dir``
    (:mod:`.run_folder`: ``config.yaml``, ``splits_final.json``, ``metrics.csv``, ``progress.png``,
    ``overlays/``, ``checkpoint_latest/``, ``checkpoint_best/``).

    ``resume=True`` continues from the latest checkpoint with the same optimizer, scheduler, scaler, RNG
    state and history. ``fast``: flags for :func:`upernet_vit.fast.optimize` over its defaults for the
    device, in training (``None``: the reference model as built).
    """

    def __init__(
        self, config: Config, output_dir: str, resume: bool = False,
        fast: Optional[Mapping[str, bool]] = MappingProxyType({}),
    ) -> None:
        self.cfg, self.output_dir = config, output_dir
        tcfg = config.train
        check_training_storage(config)
        # the run's one seeding: the model's initialization and the dropout of training follow from it
        # (resume restores the generator's state instead); the data pipeline seeds its own generators
        torch.manual_seed(tcfg.seed)
        self.precision = Precision.from_config(config)
        self.strategy = create_strategy(tcfg, self.precision)
        logger.info("%s", self.strategy.note)
        self.dist = self.strategy.start(resolve_device(tcfg.device).type)
        try:
            self._set_up(fast)
            self.folder = RunFolder(output_dir, config, resume, writes=self.dist.is_main)
        except BaseException:  # nothing of the run exists yet: only the process group to leave
            self.strategy.close()
            raise
        try:
            self.strategy.barrier()
            if resume:
                self._resume()
            if self.dist.is_main:
                self.folder.write_run_files(self.data.splits)
                self.run_logger = create_logger(tcfg.logger, output_dir, config.to_dict())
        except BaseException:
            self.release()
            raise

    def _set_up(self, fast: Optional[Mapping[str, bool]]) -> None:
        """Device, data, model, optimizer and datasets of the run (``__init__``, between joining the process
        group and opening the run folder)."""
        config, tcfg, output_dir = self.cfg, self.cfg.train, self.output_dir
        self.device = resolve_device(tcfg.device, self.dist.local_rank if self.dist.enabled else None)
        self.precision.check_device(self.device)  # fails early, e.g. for fp16 without CUDA
        if config.data.batch_size % self.dist.world_size:
            raise ValueError(
                f"data.batch_size {config.data.batch_size} is not divisible by the {self.dist.world_size} processes"
            )
        self.data = self._prepare_data(output_dir)
        self._check_memory()  # on the meta device: a run that will not fit fails before any weight exists
        self.model = self._build_model(fast)
        # every image was checked when it was read (data/image_io.py: finite pixels); the model's own check
        # would cost a device-to-host sync on each forward. A NaN from elsewhere still stops the run
        # (TrainingDiverged). release() turns the check back on for whoever keeps the model.
        self.model.check_finite = False
        self.net: nn.Module = self.strategy.wrap(self.model, self.device)  # what training calls
        self.patch_size = list(config.data.patch_size)
        self.normalizer = Normalizer(self.model.mean, self.model.std, self.data.normalization,
                                     self.data.intensity_scale)
        self.model.preprocessing = self._preprocessing()  # save_pretrained writes it with the weights
        self.optimizer = build_optimizer(self.model, tcfg, self.model.backbone.depth)
        self.scheduler = build_scheduler(self.optimizer, tcfg)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision.grad_scaler)
        weights = class_weights(tcfg.class_weights, self.data.info.label_names,
                                (c.classes() for c in self.data.train_cases))
        self.criterion = DiceCELoss(class_weights=weights).to(self.device)
        batches = config.data.batch_size
        self.train_set = PatchDataset(self.data.train_cases, self.patch_size, self.normalizer,
                                      tcfg.num_iterations_per_epoch * batches, tcfg.seed, config.data.augmentation,
                                      FOREGROUND_FRACTION if self.data.volumes else 0.0)
        self.val_set = PatchDataset(self.data.val_cases, self.patch_size, self.normalizer,
                                    tcfg.num_val_iterations_per_epoch * batches, tcfg.seed + 1, None)
        self.start_epoch = 0
        self.history: List[Dict[str, float]] = []
        self.best_ema = -math.inf
        self.best_epoch: Optional[int] = None  # the epoch checkpoint_best holds
        self.ema: Optional[float] = None
        self.run_logger = RunLogger()  # the main process's replaces it (train.logger)
        self.overlay_paths: List[str] = []  # written by the last validate(write_overlays=True)

    def _prepare_data(self, output_dir: str) -> PreparedData:
        """The dataset, read through the data cache (``data.cache_dir``, default ``.upernet-vit-cache``
        beside the run folder; never in the dataset): the main process builds it if needed, the others then
        read the one it built."""
        cfg = self.cfg.data
        cache_root = None
        if cfg.format != "demo" and cfg.root:
            cache_root = cfg.cache_dir or os.path.join(os.path.dirname(os.path.abspath(output_dir)), DEFAULT_CACHE_NAME)
            refuse_overlap(cache_root, {"data.root": cfg.root}, "data.cache_dir",
                           ": the cache would be written among the dataset's files")
        if self.dist.is_main:
            data = prepare_data(cfg, cache_root)
        self.strategy.barrier()
        if not self.dist.is_main:
            data = prepare_data(cfg, cache_root)
        return data

    def _build_model(self, fast: Optional[Mapping[str, bool]]) -> UperNetViT:
        """The model for the dataset's classes and channels, on the device, with the fast paths."""
        info, cfg = self.data.info, self.cfg
        if cfg.model.num_classes is not None and cfg.model.num_classes != info.num_classes:
            raise ValueError(
                f"model.num_classes is {cfg.model.num_classes} but the dataset has {info.num_classes} labels "
                f"{info.label_names}; remove model.num_classes or make it match"
            )
        model = UperNetViT.from_config(cfg, num_classes=info.num_classes, in_chans=info.num_channels)
        patch = list(cfg.data.patch_size)
        if min(patch) < model.patch_size:
            raise ValueError(
                f"data.patch_size {patch} must be 2 sizes, each >= the backbone patch "
                f"({model.patch_size} px for {model.backbone.name})"
            )
        model.check_device(self.device)
        model = self.strategy.place(model, self.device)
        if fast is not None:
            from ..fast import optimize

            optimize(model.train(), **fast)  # its defaults for this device, in training
        return model

    def _check_memory(self) -> None:
        """Log the memory estimate of a training step; refuse a run that will not fit (``train.check_memory``).
        The model it counts is built on the meta device (shapes and dtypes, no storage, no weights read)."""
        from .memory import available_memory, check_fits, estimate_training_memory

        tcfg = self.cfg.train
        with torch.device("meta"):
            shape = UperNetViT.from_config(self.cfg, num_classes=self.data.info.num_classes,
                                           in_chans=self.data.info.num_channels, checkpoint_path=None, pretrained=False)
        estimate = self.strategy.per_process(estimate_training_memory(
            shape, self.cfg.data.batch_size // self.dist.world_size, self.cfg.data.patch_size, tcfg.amp,
            tcfg.optimizer))
        logger.info("memory estimate per process: %.2f GB (weights %.2f, gradients and optimizer %.2f, "
                    "activations %.2f)", *(b / 2**30 for b in (estimate.total, estimate.weights,
                                                               estimate.optimizer, estimate.activations)))
        if tcfg.check_memory:
            check_fits(estimate, available_memory(self.device), shape, self.cfg.lora.enabled)

    def release(self) -> None:
        """Close the logger, give up the run folder's lock and leave the process group (``run`` does at its
        end; a Trainer that is not run can call it)."""
        self.run_logger.close()
        self.run_logger = RunLogger()
        self.folder.release()
        self.strategy.close()
        self.model.check_finite = True

    def _preprocessing(self) -> Dict[str, Any]:
        """What predict needs to treat inputs as training did (the model's record, ``preprocessing.json``)."""
        info = self.data.info
        return ModelRecord(
            mean=list(self.normalizer.mean.flatten().tolist()), std=list(self.normalizer.std.flatten().tolist()),
            normalization=self.data.normalization, label_values=list(info.label_values),
            patch_size=list(self.patch_size), intensity_scale=float(self.data.intensity_scale),
            intensity_range=list(self.data.intensity_range), label_names=list(info.label_names),
            num_channels=info.num_channels, file_ending=info.file_ending,
            slice_axis=self.cfg.data.slice_axis, context_slices=self.cfg.data.context_slices,
            channel_normalization=self.data.channel_normalization,
        ).to_json()

    def _resume(self) -> None:
        """Weights, optimizer, scheduler, scaler, RNG and history from ``checkpoint_latest``."""
        state = self.strategy.load_state(self.folder, self.model, self.optimizer, self.device)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_torch"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.start_epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.best_ema, self.best_epoch, self.ema = float(state["best_ema"]), state["best_epoch"], state["ema"]

    def _training_state(self, next_epoch: int, optimizer_state: Dict[str, Any]) -> Dict[str, Any]:
        return {
            "epoch": next_epoch,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "history": self.history,
            "best_ema": self.best_ema,
            "best_epoch": self.best_epoch,
            "ema": self.ema,
        }

    def _check_weights_finite(self, next_epoch: int, weights: Optional[Mapping[str, torch.Tensor]] = None) -> None:
        """A NaN model is never written, never as best: every rank acts on the same verdict."""
        bad = self.strategy.agree(non_finite_tensors(self.model.state_dict() if weights is None else weights))
        if bad:
            raise TrainingDiverged(
                f"training stopped: after epoch {next_epoch} {len(bad)} weight tensor(s) hold NaN or infinity "
                f"(e.g. {bad[0]}); {LATEST} is not written and keeps its previous epoch"
            )

    # ------------------------------------------------------------------ loops
    def _loader(self, dataset: PatchDataset, epoch: int) -> DataLoader:
        dataset.set_epoch(epoch)
        return DataLoader(
            dataset,
            batch_size=self.cfg.data.batch_size // self.dist.world_size,
            sampler=self.strategy.sampler(dataset),
            num_workers=self.cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def _loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with self.precision.autocast(self.device):
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
            grad_norm = self.strategy.grad_norm(torch.nn.utils.clip_grad_norm_(params, clip or math.inf))
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
        stats = self.strategy.all_reduce_sum(torch.tensor([total, count], dtype=torch.float64))
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
        last = self.folder.latest()  # written after each epoch: it holds `epoch` epochs
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
        with self.strategy.evaluation_weights(self.model):
            for images, labels in self._loader(self.val_set, epoch):
                total += float(self._loss(images.to(self.device), labels.to(self.device)))
                count += 1
        stats = self.strategy.all_reduce_sum(torch.tensor([total, count], dtype=torch.float64))
        return float(stats[0] / max(stats[1], 1))

    @torch.no_grad()
    def validate(self, write_overlays: bool = False) -> Dict[str, float]:
        """Whole-image sliding-window Dice/IoU on this fold's validation cases, split across processes (with
        the strategy's evaluation weights)."""
        self.model.eval()
        info = self.data.info
        counts = torch.zeros(info.num_classes, 3, dtype=torch.int64)
        self.overlay_paths = []
        mine = self.data.val_cases[self.dist.rank :: self.dist.world_size]
        with self.strategy.evaluation_weights(self.model):
            for i, case in enumerate(mine):
                self._validate_case(i, case, counts, write_overlays)
        counts = self.strategy.all_reduce_sum(counts)
        return summarize(counts, info.label_names, exclude=self.data.absent)

    def _validate_case(self, i: int, case: Case, counts: torch.Tensor, write_overlays: bool) -> None:
        """Add case ``i`` of this rank's validation cases to ``counts`` ``[K, 3]``; write its overlay."""
        info = self.data.info
        image = self.normalizer(torch.from_numpy(case.pixels())).to(self.device)
        probs = tta_probabilities(
            self.model, image, self.patch_size, self.cfg.train.val_scales, mirror=self.cfg.train.val_mirror,
            amp_dtype=self.precision.compute_dtype,
        )
        pred = probs.argmax(0).cpu()
        counts += confusion_counts(pred, torch.from_numpy(case.classes()), info.num_classes)
        if write_overlays and self.dist.is_main and i < self.cfg.train.num_overlays:
            from ..runs.plots import save_overlay

            folder = os.path.join(self.output_dir, "overlays")
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"{case.case_id.replace('/', '_')}.png")  # a volume's slice: <volume>_<slice>
            raw = np.asarray(case.image, dtype=np.float32)  # the slice itself, as stored (no context channels)
            save_overlay(raw, case.classes(), pred.numpy(), info.num_classes, path,
                         title=case.case_id)
            self.overlay_paths.append(path)

    def _epoch_row(self, epoch: int, train_loss: float, val_loss: float, metrics: Dict[str, float], lr: float,
                   seconds: float) -> Dict[str, float]:
        """The epoch's ``metrics.csv`` row (NaN for what was not validated)."""
        row: Dict[str, float] = {
            "epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
            "val_dice_mean": metrics.get("dice_mean", math.nan), "val_iou_mean": metrics.get("iou_mean", math.nan),
            "ema_dice": self.ema if self.ema is not None else math.nan, "lr": lr, "epoch_time_s": seconds,
        }
        names = self.data.info.label_names
        row.update({f"val_dice_{n}": metrics.get(f"dice_{n}", math.nan) for n in names})
        row.update({f"val_iou_{n}": metrics.get(f"iou_{n}", math.nan) for n in names})
        return row

    def _save_epoch(self, epoch: int, improved: bool) -> None:
        """Check and write the checkpoint of ``epoch``: the strategy gathers the weights and optimizer state
        as one process holds them (collective), rank 0 writes them: the same model folder, the same
        ``training_state.pt`` whatever the strategy."""
        weights = self.strategy.gather_weights(self.model)  # None: the model's own
        self._check_weights_finite(epoch + 1, weights)  # before the optimizer state is gathered: a NaN run stops
        optimizer_state = self.strategy.gather_optimizer(self.model, self.optimizer)
        if self.dist.is_main:
            self.folder.save_epoch(self.model, self._training_state(epoch + 1, optimizer_state), improved,
                                   self.history, weights)

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
                dice = metrics.get("dice_mean", math.nan)
                if not math.isnan(dice):
                    self.ema = dice if self.ema is None else 0.9 * self.ema + 0.1 * dice
                row = self._epoch_row(epoch, train_loss, val_loss, metrics, lr, time.perf_counter() - start)
                self.history.append(row)
                improved = self.ema is not None and self.ema > self.best_ema
                if improved:
                    self.best_ema, self.best_epoch = float(self.ema), epoch + 1
                self._save_epoch(epoch, improved)
                if self.dist.is_main:
                    self._log_to_run_logger(epoch + 1, row)
                    logger.info(
                        "epoch %d/%d  train_loss %.4f  val_loss %.4f  val_dice %.4f  ema_dice %.4f%s  lr %.2e  %.1f s",
                        epoch + 1, tcfg.num_epochs, train_loss, val_loss, dice, row["ema_dice"],
                        " (best)" if improved else "", lr, row["epoch_time_s"],
                    )
                self.strategy.barrier()
        finally:
            self.release()
        return self.history
