"""Crashes and divergence (issue 11): interrupted checkpoint swaps, kill -9 during the best save, the run
folder lock, a crash between weights and checksum, full disks and file-size limits, and training that
stops on a non-finite loss, gradient or weight without saving anything non-finite."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from upernet_vit import UperNetViT
from upernet_vit.runs.checkpoints import checkpoint_epoch, recover_run_folder
from upernet_vit.training.trainer import Trainer, TrainingDiverged
from helpers import TINY_CONFIG, config_file as _config_file, one_error_line as _one_error_line, tiny_model, tiny_train_config

pytestmark = pytest.mark.reliability  # what a user's bad input, damaged file or crash leads to


# ---------------------------------------------------------------------------- interrupted checkpoint writes
def test_leftovers_of_an_interrupted_swap_are_cleaned_or_restored(tmp_path):
    run = tmp_path / "run"
    for folder in ("checkpoint_latest.tmp", "checkpoint_best.old", "checkpoint_latest", "checkpoint_latest.old"):
        (run / folder).mkdir(parents=True)
        (run / folder / "training_state.pt").write_text(folder)
    (run / ".metrics.csv.tmp-1234abcd").write_text("partial")
    recover_run_folder(str(run))
    assert sorted(os.listdir(run)) == ["checkpoint_best", "checkpoint_latest"]
    assert (run / "checkpoint_best" / "training_state.pt").read_text() == "checkpoint_best.old"  # restored
    assert (run / "checkpoint_latest" / "training_state.pt").read_text() == "checkpoint_latest"  # kept


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import yaml
    from upernet_vit.cli import main
    from upernet_vit.runs import checkpoints
    from upernet_vit.training import trainer

    kill_at = int(os.environ.get("KILL_AT_BEST_SAVE", "0"))  # kill during the N-th checkpoint_best write
    saves = []
    original = checkpoints.write_folder_atomically

    def write_folder_atomically(final, write):
        if final.endswith("checkpoint_best"):
            saves.append(final)
            if len(saves) == kill_at:
                def half_then_die(tmp):
                    open(os.path.join(tmp, "model.safetensors"), "wb").write(b"partial")
                    os.kill(os.getpid(), signal.SIGKILL)
                return original(final, half_then_die)
        return original(final, write)

    checkpoints.write_folder_atomically = write_folder_atomically
    # validation Dice by epoch, so epochs 1-3 are each the best so far and epoch 4 is not (a tiny model
    # on a few iterations learns nothing to rank epochs by)
    trainer.Trainer.validate = lambda self, write_overlays=False: {"dice_mean": [0.1, 0.2, 0.3, 0.0][len(self.history)]}
    sys.exit(main(sys.argv[1:]))
""")


def test_kill_during_the_best_save_then_resume_gives_the_uninterrupted_best(tmp_path):
    """kill -9 while checkpoint_best is written (after checkpoint_latest of the same epoch): --resume
    redoes the best save, so checkpoint_best equals an uninterrupted run's, and no .tmp stays."""
    import yaml

    cfg = dict(TINY_CONFIG, train=dict(TINY_CONFIG["train"], num_epochs=4))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    script = tmp_path / "run_with_kill.py"
    script.write_text(_KILL_SCRIPT)

    def train(run, kill_at=0, resume=False):
        env = dict(os.environ, KILL_AT_BEST_SAVE=str(kill_at))
        args = [sys.executable, str(script), "train", str(config), "--output", str(tmp_path / run)]
        return subprocess.run(args + (["--resume"] if resume else []), env=env, capture_output=True, text=True)

    assert train("straight").returncode == 0
    best_epochs = []
    import csv

    with open(tmp_path / "straight" / "metrics.csv") as f:
        best = -1.0
        for row in csv.DictReader(f):
            if float(row["ema_dice"]) > best:
                best = float(row["ema_dice"])
                best_epochs.append(int(row["epoch"]))
    assert best_epochs == [1, 2, 3]  # the kill hits the last best save, which replaces an older best

    killed = train("killed", kill_at=len(best_epochs))
    assert killed.returncode == -9, killed.stderr[-2000:]
    run = tmp_path / "killed"
    assert checkpoint_epoch(str(run / "checkpoint_best")) == best_epochs[-2]  # the stale best
    assert (run / "checkpoint_best.tmp").is_dir()
    from upernet_vit.runs.checkpoints import resolve_model_dir

    # predict before any resume takes the checkpoint that holds the best epoch, not the stale best
    assert resolve_model_dir(str(run), "best") == str(run / "checkpoint_latest")

    resumed = train("killed", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "redoing the" in resumed.stderr
    assert not any(name.endswith((".tmp", ".old")) for name in os.listdir(run))
    assert checkpoint_epoch(str(run / "checkpoint_best")) == best_epochs[-1]
    a = load_file(tmp_path / "straight" / "checkpoint_best" / "model.safetensors")
    b = load_file(run / "checkpoint_best" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_trainer_cannot_take_a_run_folder_in_use(tmp_path):
    run = str(tmp_path / "run")
    first = Trainer(tiny_train_config(train={"num_epochs": 1}), run)
    (tmp_path / "run" / "checkpoint_latest.tmp").mkdir()  # what the first run may be writing right now
    with pytest.raises(FileExistsError, match=r"in use by another training process \(pid \d+\)"):
        Trainer(tiny_train_config(train={"num_epochs": 1}), run)
    assert (tmp_path / "run" / "checkpoint_latest.tmp").is_dir()  # the second one touched nothing
    first.run()  # releases the folder
    Trainer(tiny_train_config(train={"num_epochs": 1}), run, resume=True).release()


def test_a_failed_swap_puts_the_previous_checkpoint_back(tmp_path, monkeypatch):
    from upernet_vit.runs import checkpoints

    final = tmp_path / "checkpoint_latest"
    final.mkdir()
    (final / "training_state.pt").write_text("previous")
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(src).endswith(".tmp"):
            raise OSError(5, "Input/output error", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(checkpoints.os, "replace", failing_replace)
    with pytest.raises(OSError):
        checkpoints.write_folder_atomically(str(final), lambda tmp: open(os.path.join(tmp, "x"), "w").close())
    assert (final / "training_state.pt").read_text() == "previous"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_latest", "checkpoint_latest.tmp"]  # recover removes .tmp


def test_a_crash_between_weights_and_checksum_leaves_no_stale_checksum(tmp_path, monkeypatch):
    from upernet_vit import pretrained

    folder = tmp_path / "m"
    tiny_model().save_pretrained(folder)
    real_write = pretrained.atomic_write

    def crash_at_checksum(path, write):
        if path.endswith("SHA256SUMS"):
            raise KeyboardInterrupt  # the process dies here
        real_write(path, write)

    monkeypatch.setattr(pretrained, "atomic_write", crash_at_checksum)
    with pytest.raises(KeyboardInterrupt):
        tiny_model(hidden_size=32).save_pretrained(folder)  # new weights, same architecture
    assert not (folder / "SHA256SUMS").exists()
    UperNetViT.from_pretrained(folder)  # the new weights load; no false "damaged" report


# ---------------------------------------------------------------------------- full disks and file-size limits
def test_a_full_disk_while_saving_is_one_line_removes_the_partial_checkpoint_and_is_logged(tmp_path, capsys, monkeypatch):
    import errno

    from upernet_vit.cli import main
    from upernet_vit.training import trainer

    def full_disk(obj, f):
        f.write(b"x" * 1000)  # part of the file is written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer.torch, "save", full_disk)
    run = tmp_path / "run"
    assert main(["train", _config_file(tmp_path, num_epochs=1), "--output", str(run)]) == 1
    line = _one_error_line(capsys.readouterr().err, "train")
    assert f"'{run / 'checkpoint_latest'}': no space left on the device" in line
    assert sorted(n for n in os.listdir(run) if n.startswith("checkpoint")) == []  # no partial .tmp folder
    log = (run / "train.log").read_text()
    assert line in log and "Traceback" in log  # the log keeps the traceback


def test_disk_errors_are_described_by_path_and_cause():
    import errno

    from upernet_vit.cli import describe_error

    for code, cause in [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only"), (errno.EACCES, "permission denied"),
                        (errno.ENOTDIR, "is a file, not a folder"), (errno.EFBIG, "too large for this file system")]:
        text = describe_error(OSError(code, os.strerror(code), "/data/run/x"))
        assert text.startswith("'/data/run/x': ") and cause in text
    assert describe_error(RuntimeError("CUDA out of\nmemory")) == "RuntimeError: CUDA out of memory"  # one line


def test_a_file_too_large_for_the_file_system_is_an_os_error_not_a_zip_error(tmp_path):
    import errno

    # a real limit (RLIMIT_FSIZE, as FAT32's 4 GB would be) in a child process: torch's own zip writer turns
    # the write's EFBIG into "unexpected pos N vs M"; save_torch raises the OSError and leaves no file behind
    script = (
        "import resource, sys, torch\n"
        "from upernet_vit.fileio import atomic_write, save_torch\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
        "path, how = sys.argv[1], sys.argv[2]\n"
        "state = {'x': torch.zeros(100_000)}\n"
        "try:\n"
        "    if how == 'torch': torch.save(state, open(path, 'wb'))\n"
        "    else: atomic_write(path, lambda tmp: save_torch(state, tmp))\n"
        "except Exception as err: print(type(err).__name__, err.errno if isinstance(err, OSError) else err)\n"
    )
    def run(how):
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"{how}.pt"), how], capture_output=True,
                             text=True, timeout=120)
        return out.stdout.strip()

    assert "unexpected pos" in run("torch")  # what this guards against
    assert run("ours") == f"OSError {errno.EFBIG}"
    assert not any(n.startswith(".ours.pt") or n == "ours.pt" for n in os.listdir(tmp_path))


def test_only_disk_errors_of_the_scratch_file_are_renamed():
    import errno

    from upernet_vit.fileio import as_os_error

    assert as_os_error(OSError("cannot write mode RGBA as JPEG"), "/out/a.png", "/out/.a.tmp") is None  # no errno
    other = OSError(errno.ENOENT, "No such file or directory", "/src/model.safetensors")
    assert as_os_error(other, "/run/checkpoint_best", "/run/checkpoint_best.tmp") is None  # another file
    inside = OSError(errno.ENOSPC, "No space left on device", "/run/checkpoint_best.tmp/model.safetensors")
    assert as_os_error(inside, "/run/checkpoint_best", "/run/checkpoint_best.tmp").filename == "/run/checkpoint_best"
    assert as_os_error(RuntimeError("os error 28"), "/x", "/x.tmp") is None  # only safetensors' own errors


# ---------------------------------------------------------------------------- divergence
class _NaNLossAtEpoch2(Trainer):
    def _loss(self, images, labels):
        loss = super()._loss(images, labels)
        return loss * float("nan") if self.history and len(self.history) == 1 else loss


def test_a_non_finite_loss_stops_training_and_nothing_nan_is_saved(tmp_path):
    run = str(tmp_path / "run")
    with pytest.raises(TrainingDiverged, match=r"non-finite loss nan.*epoch 2, iteration 1.*checkpoint_latest \(epoch 1\)"):
        _NaNLossAtEpoch2(tiny_train_config(), run).run()
    assert checkpoint_epoch(os.path.join(run, "checkpoint_latest")) == 1
    for name in ("checkpoint_latest", "checkpoint_best"):
        weights = load_file(os.path.join(run, name, "model.safetensors"))
        assert all(torch.isfinite(v).all() for v in weights.values())


class _NaNGradient(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        next(self.model.head.parameters()).register_hook(lambda g: g * float("nan"))  # the loss stays finite


@pytest.mark.parametrize("clip", [12.0, 0.0])  # with clipping off (0) the norm is still computed and checked
def test_a_non_finite_gradient_stops_training(tmp_path, clip):
    run = str(tmp_path / "run")
    with pytest.raises(TrainingDiverged, match=r"loss \d\.\d+ / gradient norm nan.*epoch 1, iteration 1.*no checkpoint yet"):
        _NaNGradient(tiny_train_config(train={"gradient_clip": clip}), run).run()
    assert not os.path.exists(os.path.join(run, "checkpoint_latest"))


class _InfWeightInEpoch2(Trainer):
    def train_epoch(self, epoch):
        loss = super().train_epoch(epoch)
        if epoch == 1:  # e.g. an optimizer step that overflowed with a finite loss and gradient
            with torch.no_grad():
                self.model.head.classifier.bias[0] = float("inf")
        return loss


class _ScaledWithNaNSteps(Trainer):
    """fp16-style loss scaling on CPU (a GradScaler does the bookkeeping), with non-finite gradients at the
    first ``bad_steps`` iterations."""

    def __init__(self, *args, bad_steps, **kwargs):
        super().__init__(*args, **kwargs)
        self.scaler = torch.amp.GradScaler("cpu", enabled=True)
        self.calls = 0

        def poison(grad):
            self.calls += 1
            return grad * float("nan") if self.calls <= bad_steps else grad

        next(self.model.head.parameters()).register_hook(poison)


def test_under_loss_scaling_non_finite_steps_are_skipped_and_counted(tmp_path, caplog, recwarn):
    import logging

    with caplog.at_level(logging.WARNING):
        history = _ScaledWithNaNSteps(tiny_train_config(train={"num_epochs": 1}), str(tmp_path / "a"), bad_steps=1).run()
    assert "skipped 1 of 2 steps" in caplog.text and np.isfinite(history[0]["train_loss"])
    # our log line says it; torch's "lr_scheduler.step() before optimizer.step()" warning would only mislead
    assert not [w for w in recwarn if "lr_scheduler.step" in str(w.message)]
    with pytest.raises(TrainingDiverged, match=r"epoch 1, iteration 2"):  # no finite step in the epoch
        _ScaledWithNaNSteps(tiny_train_config(train={"num_epochs": 1}), str(tmp_path / "b"), bad_steps=2).run()


def test_a_model_with_non_finite_weights_is_never_saved(tmp_path):
    run = str(tmp_path / "run")
    with pytest.raises(TrainingDiverged, match=r"after epoch 2 1 weight tensor\(s\) hold NaN.*head.classifier.bias"):
        _InfWeightInEpoch2(tiny_train_config(), run).run()
    assert checkpoint_epoch(os.path.join(run, "checkpoint_latest")) == 1
