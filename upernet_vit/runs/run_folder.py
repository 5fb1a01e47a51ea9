"""A training run's folder: one process holds it, a crash leaves nothing that ``--resume`` cannot mend.

    <run>/.upernet-vit-run      marks a folder train created: it writes only into such a folder (or a new
                                or empty one), never among a user's files (claim_run_folder)
    <run>/.lock                 flock of the training process (checkpoints.RunLock)
    <run>/config.yaml           the run's whole config; splits_final.json, its folds
    <run>/checkpoint_latest/    save_pretrained files (preprocessing.json among them) + training_state.pt
    <run>/checkpoint_best/      a copy of checkpoint_latest made at a best epoch
    <run>/metrics.csv           one row per epoch, written after that epoch's checkpoint; progress.png

:class:`RunFolder` opens a folder for a new run or a resumed one, writes each epoch's checkpoint and
metrics row in crash-safe order, and reads a checkpoint back for ``--resume`` after checking that the
config still describes it. Only the main process of a DDP or FSDP run writes.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from typing import Any, Callable, Dict, List, Optional

import torch
import yaml

from ..config import Config, config_to_yaml, load_config, save_config
from ..fileio import atomic_write, save_torch, write_text
from ..model import UperNetViT
from ..pretrained import WEIGHTS_NAME, verify_checksum
from . import checkpoints
from .checkpoints import BEST, LATEST, STATE_NAME, RunLock, latest_checkpoint, recover_run_folder, repair_best
from .outputs import refuse_overlap

logger = logging.getLogger(__name__)

RUN_MARKER = ".upernet-vit-run"
TENSORBOARD_DIR = "tensorboard"  # train.logger tensorboard's event files (training/loggers.py)
WANDB_ID_FILE = "wandb_run_id.txt"  # train.logger wandb's run id, so --resume continues the same W&B run
# what a run folder holds: a folder made before RUN_MARKER existed counts as a run when it has a .lock and
# nothing else but these
_RUN_ENTRIES = {".lock", "config.yaml", "splits_final.json", "metrics.csv", "progress.png", "train.log", "overlays",
                TENSORBOARD_DIR, WANDB_ID_FILE, "wandb"}

# keys that may differ between a run and its --resume (they do not change what is computed)
# train.distributed: a checkpoint is one process's under DDP and FSDP alike (a run out of memory may switch)
RESUME_FREE_KEYS = {"data.num_workers", "train.device", "train.output_dir", "train.num_overlays", "train.logger",
                    "train.check_memory", "train.distributed", "data.cache_dir"}


def _is_run_entry(name: str) -> bool:
    return (name in _RUN_ENTRIES or name.startswith((LATEST, BEST)) or (name.startswith(".") and ".tmp-" in name)
            or name.endswith(".tmp.png"))  # plots.py's temporary progress.png


def claim_run_folder(path: str, inputs: Optional[Dict[str, Optional[str]]] = None) -> None:
    """Make ``path`` a run folder (created, or new and empty, or a run's own), or refuse it: ``train``
    writes ``config.yaml``, ``train.log``, ... only where they cannot replace a user's files, and never
    into, around or inside one of ``inputs`` (``{name: path}``, e.g. the dataset). A FileExistsError names
    a file of the folder that no run wrote."""
    refuse_overlap(path, inputs or {}, "output_dir", ": the run's files would go among the data")
    if os.path.isfile(os.path.join(path, RUN_MARKER)):
        return
    if os.path.lexists(path) and not os.path.isdir(path):
        raise FileExistsError(f"output_dir {path!r} is a file, not a folder; choose a folder for the run")
    entries = sorted(os.listdir(path)) if os.path.isdir(path) else []
    legacy = ".lock" in entries and all(_is_run_entry(n) for n in entries)  # a run from before the marker
    if entries and not legacy:
        foreign = [n for n in entries if not _is_run_entry(n)] or entries
        raise FileExistsError(
            f"output_dir {path!r} holds files that no training run wrote there (e.g. {foreign[0]!r}, {len(entries)} "
            f"entries): train writes its run files (config.yaml, train.log, checkpoints) only into a new or empty "
            f"folder or one of its own runs, never among other files; choose a new folder, e.g. "
            f"{os.path.join(path, 'runs', 'my_run')!r} (if it is a run folder of an older upernet-vit that you "
            f"added files to, move them out, or mark it as a run: touch {os.path.join(path, RUN_MARKER)})"
        )
    os.makedirs(path, exist_ok=True)
    write_text(os.path.join(path, RUN_MARKER), "a training run folder of upernet-vit: train writes here\n")


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and key != "backbone_kwargs":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class RunFolder:
    """The run folder ``path`` of a training job with ``config``.

    On the main process (``writes=True``) it is created and locked, a finished or started run in it is
    refused unless ``resume``, and what a crash left half-written is removed or restored."""

    def __init__(self, path: str, config: Config, resume: bool, writes: bool = True) -> None:
        self.path, self.config, self.writes = path, config, writes
        self.lock: Optional[RunLock] = None
        if not writes:
            return
        claim_run_folder(path, {"data.root": config.data.root})
        self.lock = RunLock(path)  # before touching any file of the run
        try:
            if not resume and latest_checkpoint(path):
                raise FileExistsError(
                    f"{path} already holds a run (checkpoint_latest); pass resume=True to continue it or "
                    f"choose another output_dir"
                )
            recover_run_folder(path)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Give up the lock (the process's end does too)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def latest(self) -> Optional[str]:
        return latest_checkpoint(self.path)

    def write_run_files(self, splits: List[Dict[str, List[str]]]) -> None:
        atomic_write(os.path.join(self.path, "config.yaml"), lambda p: save_config(self.config, p))
        text = json.dumps(splits, indent=1)
        atomic_write(os.path.join(self.path, "splits_final.json"), lambda p: write_text(p, text))

    def save_epoch(self, model: UperNetViT, state: Dict[str, Any], best: bool, history: List[Dict[str, float]],
                   weights: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """``checkpoint_latest`` (``model.save_pretrained``, of ``weights`` when given: a sharded model's,
        gathered; and ``state``), then its copy as ``checkpoint_best`` when ``best``,
        then the metrics row. ``state["best_epoch"]`` is on disk before the best copy starts, so a crash
        between the two is repaired at resume (:func:`~.checkpoints.repair_best`); the row comes last, so
        ``metrics.csv`` never shows an epoch that no checkpoint holds."""
        state = {**state, "config": config_to_yaml(self.config)}

        def write(folder: str) -> None:
            model.save_pretrained(folder, state_dict=weights)  # with preprocessing.json
            save_torch(state, os.path.join(folder, STATE_NAME))

        latest = os.path.join(self.path, LATEST)
        checkpoints.write_folder_atomically(latest, write)
        if best:
            checkpoints.copy_checkpoint(latest, os.path.join(self.path, BEST))
        self.write_metrics(history)

    def read_for_resume(self, model: UperNetViT, device: torch.device,
                        load: Optional[Callable[[Dict[str, torch.Tensor]], Any]] = None) -> Dict[str, Any]:
        """Load ``checkpoint_latest``'s weights into ``model`` (with ``load``, default
        ``model.load_state_dict``; a sharded model passes its own) and return its training state. The config
        is compared first, so a changed architecture is named as such, not as a ``load_state_dict``
        traceback. On the main process the best checkpoint is repaired and ``metrics.csv`` rewritten."""
        path = self.latest()
        if path is None:
            raise FileNotFoundError(f"resume=True: no {LATEST} with {STATE_NAME} in {self.path}")
        state = torch.load(os.path.join(path, STATE_NAME), map_location="cpu", weights_only=True)
        saved, now = _flatten(load_config(yaml.safe_load(state["config"])).to_dict()), _flatten(self.config.to_dict())
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in RESUME_FREE_KEYS)
        if changed:
            raise ValueError(
                f"resume=True: the config differs from the run in {self.path} in "
                + ", ".join(f"{k} ({saved.get(k)!r} -> {now.get(k)!r})" for k in changed)
                + "; resume with the run's own config.yaml, or start a new run with another output_dir"
            )
        from safetensors.torch import load_file

        verify_checksum(path)
        weights = os.path.join(path, WEIGHTS_NAME)
        try:
            (load or model.load_state_dict)(load_file(weights, device=str(device)))
        except Exception as err:
            raise ValueError(f"resume=True: cannot load {weights} into the model: {str(err).strip().splitlines()[0]}") from err
        if self.writes:
            repair_best(self.path, state["best_epoch"], int(state["epoch"]))
            if state["history"]:  # a kill between the checkpoint and metrics.csv left the csv a row behind
                self.write_metrics(state["history"])
        logger.info("resumed %s at epoch %d", path, state["epoch"])
        return state

    def write_metrics(self, history: List[Dict[str, float]]) -> None:
        """``metrics.csv`` (one row per epoch) and ``progress.png``, from the whole history."""
        path = os.path.join(self.path, "metrics.csv")

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=list(history[0]))
                writer.writeheader()
                writer.writerows(history)

        atomic_write(path, write)
        from .plots import plot_progress

        plot_progress(history, os.path.join(self.path, "progress.png"))
