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
import os
import shutil
from typing import Callable, Optional

import torch

from ..fileio import as_os_error, fsync_path

logger = logging.getLogger(__name__)

LATEST, BEST = "checkpoint_latest", "checkpoint_best"
STATE_NAME = "training_state.pt"


def write_folder_atomically(final: str, write: Callable[[str], None]) -> None:
    """``write(tmp_folder)``, flush it, then swap it in for ``final``: after a crash or power loss there is
    the old folder, its ``.old`` copy, or the complete new one. A failed write removes its partial folder."""
    tmp, old = final + ".tmp", final + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        write(tmp)
        for name in os.listdir(tmp):
            fsync_path(os.path.join(tmp, name))
        fsync_path(tmp)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint would keep a full disk full
        disk_error = as_os_error(err, final)
        if disk_error is not None:  # named by the checkpoint, not by the temporary file inside it
            raise OSError(disk_error.errno, disk_error.strerror, final) from err
        raise
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
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
    for leftover in glob.glob(os.path.join(run_dir, ".*.tmp-*")) + glob.glob(os.path.join(run_dir, "*", ".*.tmp-*")):
        os.remove(leftover)


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """``checkpoint_latest`` (or its ``.old`` if a crash hit the swap), or None."""
    for name in (LATEST, LATEST + ".old"):
        path = os.path.join(run_dir, name)
        if os.path.isfile(os.path.join(path, STATE_NAME)):
            return path
    return None


def checkpoint_epoch(folder: str) -> Optional[int]:
    """The number of epochs the checkpoint in ``folder`` holds, or None if it has no readable state.
    Memory-mapped: only the small ``epoch`` entry is read, not the optimizer state."""
    path = os.path.join(folder, STATE_NAME)
    if not os.path.isfile(path):
        return None
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    except Exception:  # a damaged best checkpoint is rewritten by repair_best
        return None


def best_epoch_of_run(run_dir: str) -> Optional[int]:
    """The best epoch recorded in ``checkpoint_latest``'s state (None: no state, or an older run)."""
    path = os.path.join(run_dir, LATEST, STATE_NAME)
    if not os.path.isfile(path):
        return None
    try:
        value = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("best_epoch")
    except Exception:
        return None
    return None if value is None else int(value)


def best_checkpoint(run_dir: str) -> Optional[str]:
    """The folder that holds the run's best epoch: ``checkpoint_best``, or ``checkpoint_latest`` when a
    crash between the two writes left ``checkpoint_best`` older than the recorded best (or missing) and the
    latest is that epoch. None if neither exists."""
    best, latest = os.path.join(run_dir, BEST), os.path.join(run_dir, LATEST)
    recorded = best_epoch_of_run(run_dir)
    if recorded is not None and checkpoint_epoch(best) != recorded and checkpoint_epoch(latest) == recorded:
        logger.warning(
            "%s holds epoch %s, not the best epoch %d (an interrupted save; --resume repairs it): using %s",
            best, checkpoint_epoch(best), recorded, latest,
        )
        return latest
    for folder in (best, latest):
        if os.path.isdir(folder):
            return folder
    return None


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
