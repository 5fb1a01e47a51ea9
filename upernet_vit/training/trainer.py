"""The training loop: an epoch of seeded, augmented patches (Dice + CE, AdamW/SGD with warmup-poly,
AMP, gradient clipping), a validation of whole images by sliding window, and ``run``, which chains them and
hands each epoch to the run folder.

What it builds on, one file each: the data (``data/prepare.py``), the run folder with its checkpoints and
metrics rows (``runs/run_folder.py``), the process group (``distributed.py``), sharded training
(``fsdp.py``), the loss (``losses.py``), the optimizer and schedule (``optim.py``), sliding-window
inference (``inference/sliding_window.py``).

Under torchrun (``WORLD_SIZE`` > 1) ``train.distributed`` picks how the processes share the work: ``ddp``
(each holds the whole model, gradients are averaged) or ``fsdp`` (weights, gradients and optimizer state
sharded; :mod:`.fsdp`). Either way each process trains on its part of the global batch, and the run
folder is the same: rank 0 writes the full weights and a one-process optimizer state.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
import warnings
from contextlib import nullcontext
from types import MappingProxyType
from typing import Any, ContextManager, Dict, List, Mapping, Optional

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from ..config import Config, check_training_storage
from ..model import UperNetViT
from ..pretrained import non_finite_tensors
from ..data.augment import PatchDataset
from ..data.datasets import Case
from ..data.normalization import Normalizer
from ..data.prepare import prepare_data
from ..devices import resolve_device
from ..inference.metrics import confusion_counts, summarize
from ..inference.sliding_window import amp_dtype, tta_probabilities
from ..runs.checkpoints import LATEST
from ..runs.run_folder import RunFolder
from .distributed import all_reduce_sum, barrier, broadcast_object, cleanup, init_distributed
from .fsdp import (full_weights, gather_model_state, gather_optimizer_state, global_grad_norm,
                   load_model_state, load_optimizer_state, shard_model)
from .loggers import RunLogger, create_logger
from .losses import DiceCELoss, class_weights, segmentation_loss
from .optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)


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
        if tcfg.distributed == "fsdp" and tcfg.amp == "fp16":  # before any process starts its group
            raise ValueError(
                "train.amp fp16 does not work with train.distributed fsdp (the GradScaler would judge each "
                "rank's gradient shards alone and the ranks could skip different steps); use train.amp bf16"
            )
        self.dist = init_distributed(resolve_device(tcfg.device).type)
        self.device = resolve_device(tcfg.device, self.dist.local_rank if self.dist.enabled else None)
        self.fsdp = tcfg.distributed == "fsdp" and self.dist.enabled  # the model is sharded (fsdp.py)
        if tcfg.distributed == "fsdp" and not self.dist.enabled:
            logger.info("train.distributed fsdp: one process trains the whole model, as without it; fsdp "
                        "shards only under torchrun with several processes")
        self.amp_dtype = amp_dtype(tcfg.amp, self.device)  # fails early for fp16 without CUDA
        if config.data.batch_size % self.dist.world_size:
            raise ValueError(
                f"data.batch_size {config.data.batch_size} is not divisible by the {self.dist.world_size} processes"
            )
        self.data = prepare_data(config.data)
        self._check_memory()  # on the meta device: a run that will not fit fails before any weight exists
        self.model = self._build_model(fast)
        if self.fsdp:  # before the optimizer, which must hold the sharded parameters
            shard_model(self.model, self.device, self.dist.world_size, torch.bfloat16 if tcfg.amp == "bf16" else None)
        self.patch_size = list(config.data.patch_size)
        self.normalizer = Normalizer(self.model.mean, self.model.std, config.data.normalization,
                                     self.data.intensity_scale)
        self.model.preprocessing = self._preprocessing()  # save_pretrained writes it with the weights
        self.optimizer = build_optimizer(self.model, tcfg, self.model.backbone.depth)
        self.scheduler = build_scheduler(self.optimizer, tcfg)
        self.scaler = torch.amp.GradScaler("cuda", enabled=tcfg.amp == "fp16")
        weights = class_weights(tcfg.class_weights, self.data.info.label_names,
                                [c.label for c in self.data.train_cases])
        self.criterion = DiceCELoss(class_weights=weights).to(self.device)
        self.net: nn.Module = (  # what training calls: FSDP's sharded model is its own wrapper
            DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.dist.enabled and not self.fsdp else self.model
        )
        batches = config.data.batch_size
        self.train_set = PatchDataset(self.data.train_cases, self.patch_size, self.normalizer,
                                      tcfg.num_iterations_per_epoch * batches, tcfg.seed, config.data.augmentation)
        self.val_set = PatchDataset(self.data.val_cases, self.patch_size, self.normalizer,
                                    tcfg.num_val_iterations_per_epoch * batches, tcfg.seed + 1, None)
        self.start_epoch = 0
        self.history: List[Dict[str, float]] = []
        self.best_ema = -math.inf
        self.best_epoch: Optional[int] = None  # the epoch checkpoint_best holds
        self.ema: Optional[float] = None
        self.run_logger = RunLogger()  # the main process's replaces it (train.logger)
        self.overlay_paths: List[str] = []  # written by the last validate(write_overlays=True)
        self.folder = RunFolder(output_dir, config, resume, writes=self.dist.is_main)
        try:
            barrier(self.dist)
            if resume:
                self._resume()
            if self.dist.is_main:
                self.folder.write_run_files(self.data.splits)
                self.run_logger = create_logger(tcfg.logger, output_dir, config.to_dict())
        except BaseException:
            self.release()
            raise

    def _build_model(self, fast: Optional[Mapping[str, bool]]) -> UperNetViT:
        """The model for the dataset's classes and channels, on the device, with the fast paths."""
        info, cfg = self.data.info, self.cfg
        if cfg.model.num_classes is not None and cfg.model.num_classes != info.num_classes:
            raise ValueError(
                f"model.num_classes is {cfg.model.num_classes} but the dataset has {info.num_classes} labels "
                f"{info.label_names}; remove model.num_classes or make it match"
            )
        torch.manual_seed(cfg.train.seed)
        model = UperNetViT.from_config(cfg, num_classes=info.num_classes, in_chans=info.num_channels)
        patch = list(cfg.data.patch_size)
        if min(patch) < model.patch_size:
            raise ValueError(
                f"data.patch_size {patch} must be 2 sizes, each >= the backbone patch "
                f"({model.patch_size} px for {model.backbone.name})"
            )
        if cfg.model.decoder.norm == "batchnorm" and self.dist.enabled and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.check_device(self.device)
        if not self.fsdp:  # fully_shard moves each process's shards there: the whole model need not fit one GPU
            model.to(self.device)
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
        estimate = estimate_training_memory(shape, self.cfg.data.batch_size // self.dist.world_size,
                                            self.cfg.data.patch_size, tcfg.amp, tcfg.optimizer)
        if self.fsdp:  # each process keeps 1/N of the weights, gradients and optimizer state, and validation
            world = self.dist.world_size  # gathers all the weights (full_weights): counted in full, erring high
            estimate = dataclasses.replace(estimate, weights=estimate.weights // world + estimate.weights,
                                           optimizer=estimate.optimizer // world)
        logger.info("memory estimate per process: %.2f GB (weights %.2f, gradients and optimizer %.2f, "
                    "activations %.2f)", *(b / 2**30 for b in (estimate.total, estimate.weights,
                                                               estimate.optimizer, estimate.activations)))
        if tcfg.check_memory:
            check_fits(estimate, available_memory(self.device), shape, self.cfg.lora.enabled)

    def release(self) -> None:
        """Close the logger and give up the run folder's lock (``run`` does at its end; a Trainer that is not
        run can call it)."""
        self.run_logger.close()
        self.run_logger = RunLogger()
        self.folder.release()

    def _preprocessing(self) -> Dict[str, Any]:
        """What predict needs to treat inputs as training did (``preprocessing.json``)."""
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

    def _resume(self) -> None:
        """Weights, optimizer, scheduler, scaler, RNG and history from ``checkpoint_latest``; under FSDP the
        full tensors (read by every rank, on the CPU) go into each rank's shards."""
        if self.fsdp:
            state = self.folder.read_for_resume(self.model, torch.device("cpu"),
                                                lambda weights: load_model_state(self.model, weights))
            load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        else:
            state = self.folder.read_for_resume(self.model, self.device)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_torch"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.start_epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.best_ema, self.best_epoch, self.ema = float(state["best_ema"]), state["best_epoch"], state["ema"]

    def _optimizer_state(self) -> Dict[str, Any]:
        """The optimizer's ``state_dict()``; under FSDP gathered from the shards on every rank (collective),
        numbered as one process numbers it, and kept on rank 0 only (``{}`` elsewhere)."""
        if self.fsdp:
            return gather_optimizer_state(self.model, self.optimizer)
        return self.optimizer.state_dict()

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
        """A NaN model is never written, never as best. Checked on every DDP process (the weights are the
        same), or on FSDP's ``weights`` gathered on rank 0, whose verdict every rank then acts on."""
        bad = non_finite_tensors(self.model.state_dict() if weights is None else weights)
        if self.fsdp:
            bad = broadcast_object(bad, self.dist)
        if bad:
            raise TrainingDiverged(
                f"training stopped: after epoch {next_epoch} {len(bad)} weight tensor(s) hold NaN or infinity "
                f"(e.g. {bad[0]}); {LATEST} is not written and keeps its previous epoch"
            )

    # ------------------------------------------------------------------ loops
    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _evaluation_weights(self) -> ContextManager[None]:
        """Around the evaluation passes. Under FSDP a forward of the sharded model is collective (each unit
        all-gathers its weights), so ranks that run different numbers of forwards would wait on each other
        for ever, and whole-image validation does: each rank has its own cases (their number need not
        divide by the ranks), each cut into as many windows as its size needs. So the full weights are
        gathered once for the pass (:func:`~.fsdp.full_weights`: memory for the whole model's weights on
        each GPU, as inference needs anyway) and every forward in it is local. DDP needs nothing."""
        return full_weights(self.model) if self.fsdp else nullcontext()

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
            # under FSDP over the gradient shards, and still the norm of all the gradients (global_grad_norm)
            grad_norm = global_grad_norm(torch.nn.utils.clip_grad_norm_(params, clip or math.inf))
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
        with self._evaluation_weights():
            for images, labels in self._loader(self.val_set, epoch):
                total += float(self._loss(images.to(self.device), labels.to(self.device)))
                count += 1
        stats = all_reduce_sum(torch.tensor([total, count], dtype=torch.float64), self.dist)
        return float(stats[0] / max(stats[1], 1))

    @torch.no_grad()
    def validate(self, write_overlays: bool = False) -> Dict[str, float]:
        """Whole-image sliding-window Dice/IoU on this fold's validation cases (split across processes; under
        FSDP with the full weights on every rank: :meth:`_evaluation_weights`)."""
        self.model.eval()
        info = self.data.info
        counts = torch.zeros(info.num_classes, 3, dtype=torch.int64)
        self.overlay_paths = []
        mine = self.data.val_cases[self.dist.rank :: self.dist.world_size]
        with self._evaluation_weights():
            for i, case in enumerate(mine):
                self._validate_case(i, case, counts, write_overlays)
        counts = all_reduce_sum(counts, self.dist)
        return summarize(counts, info.label_names, exclude=self.data.absent)

    def _validate_case(self, i: int, case: Case, counts: torch.Tensor, write_overlays: bool) -> None:
        """Add case ``i`` of this rank's validation cases to ``counts`` ``[K, 3]``; write its overlay."""
        info = self.data.info
        image = self.normalizer(torch.from_numpy(case.image)).to(self.device)
        probs = tta_probabilities(
            self.model, image, self.patch_size, self.cfg.train.val_scales, mirror=self.cfg.train.val_mirror,
            amp_dtype=self.amp_dtype,
        )
        pred = probs.argmax(0).cpu()
        counts += confusion_counts(pred, torch.from_numpy(case.label), info.num_classes)
        if write_overlays and self.dist.is_main and i < self.cfg.train.num_overlays:
            from ..runs.plots import save_overlay

            folder = os.path.join(self.output_dir, "overlays")
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"{case.case_id}.png")
            save_overlay(case.image, case.label, pred.numpy(), info.num_classes, path, title=case.case_id)
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
        """Check and write the checkpoint of ``epoch`` (rank 0 writes). Under FSDP the weights and the
        optimizer state are first gathered from the shards by every rank (collective), then rank 0 writes
        them as one process would: the same model folder, the same ``training_state.pt``."""
        weights = gather_model_state(self.model) if self.fsdp else None  # None: the model's own
        self._check_weights_finite(epoch + 1, weights)
        optimizer_state = self._optimizer_state()
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
                barrier(self.dist)
        finally:
            cleanup(self.dist)
            self.release()
        return self.history
