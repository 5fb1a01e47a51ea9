"""A run folder's checkpoints, crash-safe.

``checkpoint_latest/`` and ``checkpoint_best/`` are each written whole under ``<name>.tmp``, flushed, and
swapped in (the old one renamed to ``<name>.old`` for the moment of the swap). ``checkpoint_best`` is a copy
of ``checkpoint_latest`` made right after it when the epoch is the best so far, and the training state
records that epoch: a crash between the two writes is repaired at ``--resume`` (:func:`repair_best`), and
what a crash left half-written is removed or restored at start (:func:`recover_run_folder`).
"""
from __future__ import annotations

import glob
import logging
import math
import os
import shutil
from typing import Any, Callable, Dict, Optional

import torch
import yaml

from ..config import Config, load_config
from ..fileio import as_os_error, fsync_path
from .outputs import FolderLock
from ..pretrained import WEIGHTS_NAME

logger = logging.getLogger(__name__)

LATEST, BEST = "checkpoint_latest", "checkpoint_best"
STATE_NAME = "training_state.pt"


def write_folder_atomically(final: str, write: Callable[[str], None]) -> None:
    """``write(tmp_folder)``, flush it, then swap it in for ``final``: after a crash or power loss there is
    the old folder, its ``.old`` copy, or the complete new one. A failed write removes its partial folder
    (a partial checkpoint would keep a full disk full) and a disk error names ``final``."""
    tmp, old = final + ".tmp", final + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write(tmp)
        for name in os.listdir(tmp):
            fsync_path(os.path.join(tmp, name))
        fsync_path(tmp)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        disk_error = as_os_error(err, final, tmp)
        if disk_error is not None:
            raise disk_error from err
        raise
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if os.path.isdir(old) and not os.path.exists(final):
            os.replace(old, final)  # put the previous checkpoint back
        raise
    fsync_path(os.path.dirname(os.path.abspath(final)))
    shutil.rmtree(old, ignore_errors=True)


def copy_checkpoint(source: str, final: str) -> None:
    """``final`` becomes a copy of the checkpoint folder ``source``, atomically."""

    def write(tmp: str) -> None:
        for name in os.listdir(source):
            shutil.copyfile(os.path.join(source, name), os.path.join(tmp, name))

    write_folder_atomically(final, write)


def recover_run_folder(run_dir: str) -> None:
    """Undo what a crash inside :func:`write_folder_atomically` or ``atomic_write`` left behind: remove
    ``<name>.tmp`` folders and hidden ``.<file>.tmp-*`` files, and put back a ``<name>.old`` whose
    ``<name>`` is missing (a crash between the two renames of a swap)."""
    if not os.path.isdir(run_dir):
        return
    for name in (LATEST, BEST):
        final, tmp, old = (os.path.join(run_dir, name + suffix) for suffix in ("", ".tmp", ".old"))
        if os.path.isdir(tmp):
            logger.warning("removing %s, a checkpoint an interrupted run did not finish writing", tmp)
            shutil.rmtree(tmp)
        if os.path.isdir(old):
            if os.path.isdir(final):
                shutil.rmtree(old)
            else:
                logger.warning("restoring %s from %s (a run was interrupted while replacing it)", final, old)
                os.replace(old, final)
    for pattern in (".*.tmp-*", os.path.join(LATEST, ".*.tmp-*"), os.path.join(BEST, ".*.tmp-*")):
        for leftover in glob.glob(os.path.join(run_dir, pattern)):  # atomic_write's, of the files a run writes
            os.remove(leftover)


class RunLock(FolderLock):
    """The run folder's ``.lock`` (:class:`~upernet_vit.outputs.FolderLock`) for the life of a training
    process: a second ``train`` into the same folder fails at once instead of racing for its files."""

    def __init__(self, run_dir: str) -> None:
        super().__init__(run_dir, ".lock", "training process", "output_dir")  # the Trainer's


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """``checkpoint_latest`` (or its ``.old`` if a crash hit the swap), or None."""
    for name in (LATEST, LATEST + ".old"):
        path = os.path.join(run_dir, name)
        if os.path.isfile(os.path.join(path, STATE_NAME)):
            return path
    return None


def read_state(folder: str) -> Optional[Dict[str, Any]]:
    """The checkpoint's ``training_state.pt``, memory-mapped (the optimizer state is not read unless
    used), or None if it is missing or unreadable (a damaged best is rewritten by :func:`repair_best`)."""
    path = os.path.join(folder, STATE_NAME)
    if not os.path.isfile(path):
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None


def checkpoint_epoch(folder: str) -> Optional[int]:
    """The number of epochs the checkpoint in ``folder`` holds, or None if it has no readable state."""
    state = read_state(folder)
    return None if state is None else int(state["epoch"])


def best_checkpoint(run_dir: str) -> Optional[str]:
    """The checkpoint folder that holds the run's best epoch (the one ``checkpoint_latest``'s training state
    records): ``checkpoint_best``, or ``checkpoint_latest`` when a crash between the two writes left
    ``checkpoint_best`` older (or missing), or their ``.old`` after a crash inside a swap. A ValueError that
    says why when the run has no best (it never validated, or its Dice was never a number) or the best
    epoch is no longer on disk; None when the folder holds no run."""
    best, latest = os.path.join(run_dir, BEST), latest_checkpoint(run_dir)
    state = None if latest is None else read_state(latest)
    if state is None:  # no training state to check against: a best folder as it is
        found = next((f for f in (best, best + ".old") if os.path.isfile(os.path.join(f, WEIGHTS_NAME))), None)
        if found is None and os.path.isfile(os.path.join(run_dir, LATEST, WEIGHTS_NAME)):
            raise ValueError(f"{run_dir} has no best checkpoint ({BEST} with {WEIGHTS_NAME}); use checkpoint='latest'")
        return found
    recorded = state.get("best_epoch")
    if recorded is None:
        raise ValueError(_no_best_reason(run_dir, state))
    for folder in (best, best + ".old", latest):
        if os.path.isfile(os.path.join(folder, WEIGHTS_NAME)) and checkpoint_epoch(folder) == recorded:
            if folder != best:
                logger.warning(
                    "%s holds epoch %s, not the best epoch %d (an interrupted save; resume=True repairs it): using %s",
                    best, checkpoint_epoch(best), recorded, folder,
                )
            return folder
    raise ValueError(
        f"{run_dir}: the best epoch {recorded} is not on disk ({BEST} holds epoch {checkpoint_epoch(best)}, "
        f"{LATEST} epoch {state['epoch']}): was {BEST} replaced by hand? Use "
        + ("checkpoint='final' or checkpoint='latest'" if int(state["epoch"]) >= _planned_epochs(state)
           else "checkpoint='latest'")
    )


def _no_best_reason(run_dir: str, state: Dict[str, Any]) -> str:
    epoch, history = int(state["epoch"]), state.get("history") or []
    validated = [r for r in history if any(
        k.startswith("val_dice_") and k != "val_dice_mean" and math.isfinite(v) for k, v in r.items())]
    if not validated:
        why = (f"it stopped at epoch {epoch} before its first validation (train.val_every "
               f"{_run_config(state).train.val_every}; the last "
               f"epoch always validates)")
    else:
        why = (f"its mean foreground validation Dice was never a number in {len(validated)} validation(s): no "
               f"foreground class is in the validation cases' masks or predictions, so no epoch was picked")
    return (f"{run_dir} has no best checkpoint: {why}. Use checkpoint='latest' (epoch {epoch})"
            + (" or final" if epoch >= _planned_epochs(state) else ", or finish the run (train resume=True) for final"))


def _planned_epochs(state: Dict[str, Any]) -> int:
    return _run_config(state).train.num_epochs


def _run_config(state: Dict[str, Any]) -> Config:
    """The config a training state was saved with (``config.yaml`` text in the state)."""
    return load_config(yaml.safe_load(state["config"]))


CHECKPOINT_CHOICES = ("final", "best", "latest")


def run_checkpoint(run_dir: str, which: str = "final") -> Optional[str]:
    """The checkpoint folder of a run folder that ``predict --checkpoint`` names, or None if it has none.

    ``final``: the last epoch (``checkpoint_latest`` of a finished run; nnU-Net reports cross-validation
    with it); a run that stopped early is a ValueError naming its epoch. ``best``: :func:`best_checkpoint`
    (the EMA-Dice pick; a run without one is a ValueError saying why). ``latest``: ``checkpoint_latest``
    whatever its epoch."""
    if which not in CHECKPOINT_CHOICES:
        raise ValueError(f"checkpoint={which!r}: use one of {', '.join(map(repr, CHECKPOINT_CHOICES))}")
    if which == "best":
        return best_checkpoint(run_dir)
    latest = latest_checkpoint(run_dir)
    if latest is None or which == "latest":
        return latest
    state = read_state(latest)
    try:
        has_best = best_checkpoint(run_dir) is not None  # a crash-stale or missing best is none
    except ValueError:
        has_best = False
    if state is None:
        raise ValueError(f"{os.path.join(latest, STATE_NAME)} cannot be read; pass checkpoint='latest'"
                         + (" or checkpoint='best'" if has_best else ""))
    epochs = _planned_epochs(state)
    if int(state["epoch"]) < epochs:
        raise ValueError(
            f"{run_dir} stopped at epoch {state['epoch']} of {epochs}: it has no final checkpoint; finish it "
            f"(train resume=True) or pass checkpoint='latest' (epoch {state['epoch']})"
            + (" or checkpoint='best'" if has_best else "")
        )
    return latest


def repair_best(run_dir: str, best_epoch: Optional[int], latest_epoch: int) -> None:
    """Make ``checkpoint_best`` hold ``best_epoch`` again after a crash between the two checkpoint writes.

    The best is written right after the latest of the same epoch, so when they disagree the best epoch
    is the latest one and ``checkpoint_best`` is redone as its copy."""
    if best_epoch is None:
        return
    best = os.path.join(run_dir, BEST)
    held = checkpoint_epoch(best)
    if held == best_epoch:
        return
    if best_epoch != latest_epoch:
        logger.warning(
            "%s holds epoch %s but the best epoch was %d, which is no longer on disk; keeping it",
            best, held, best_epoch,
        )
        return
    logger.warning("redoing the %s save of epoch %d that an interrupted run did not finish (it held epoch %s)",
                   best, best_epoch, held)
    copy_checkpoint(os.path.join(run_dir, LATEST), best)


def resolve_model_dir(path: str, checkpoint: str = "final") -> str:
    """A ``save_pretrained`` folder as it is, or a run folder's checkpoint by ``checkpoint``: ``final`` (the
    last epoch of a finished run, the default, as nnU-Net), ``best`` (the EMA-Dice pick; a crash-stale
    ``checkpoint_best`` is skipped) or ``latest`` (see :func:`run_checkpoint`).
    A run's ``checkpoint_best`` given directly is held against the run's record in the same way."""
    if os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        run_dir, name = os.path.split(os.path.normpath(path))
        if name == BEST and latest_checkpoint(run_dir):
            holder = best_checkpoint(run_dir)
            if holder is not None and os.path.normpath(holder) != os.path.normpath(path):
                logger.warning("using %s, which holds the run's best epoch, instead of %s", holder, path)
                return holder
        return path
    candidate = run_checkpoint(path, checkpoint) if os.path.isdir(path) else None
    if candidate is not None and os.path.isfile(os.path.join(candidate, WEIGHTS_NAME)):
        return candidate
    raise FileNotFoundError(
        f"{path!r} is neither a model folder (model.safetensors + config.yaml) nor a run folder with checkpoints"
    )
