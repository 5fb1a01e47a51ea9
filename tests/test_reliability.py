"""No silent wrong results: non-finite data, damaged files, crashes between checkpoint writes (issue 11)."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from upernet_vit import UperNetViT
from upernet_vit.backbones.checkpoint import read_checkpoint
from upernet_vit.config import ConfigError, TrainConfig, load_config
from upernet_vit.training.checkpoints import checkpoint_epoch, recover_run_folder
from upernet_vit.training.data import load_folders
from upernet_vit.training.image_io import read_image
from upernet_vit.training.trainer import Trainer, TrainingDiverged
from helpers import TINY_CONFIG, tiny_model, tiny_train_config


def _float_tiff(path, nan_at=()):
    image = np.random.default_rng(0).random((16, 16), dtype=np.float32)
    for yx in nan_at:
        image[yx] = np.nan
    Image.fromarray(image, mode="F").save(path)


# ---------------------------------------------------------------------------- non-finite data
def test_a_nan_pixel_in_an_image_file_is_an_error_naming_the_file_and_count(tmp_path):
    _float_tiff(tmp_path / "ok.tif")
    assert read_image(str(tmp_path / "ok.tif")).shape == (1, 16, 16)
    _float_tiff(tmp_path / "bad.tif", nan_at=[(3, 4), (5, 5)])
    with pytest.raises(ValueError, match=r"bad.tif.* 2 non-finite pixel value\(s\)"):
        read_image(str(tmp_path / "bad.tif"))


def test_training_data_with_a_nan_pixel_fails_before_training(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(3):
        _float_tiff(root / "images" / f"c{i}.tif", nan_at=[(0, 0)] if i == 2 else [])
        Image.fromarray(np.eye(16, dtype=np.uint8)).save(root / "masks" / f"c{i}.png")
    with pytest.raises(ValueError, match=r"c2.tif.* 1 non-finite"):
        load_folders(str(root))
    cfg = tiny_train_config(data={"format": "folders", "root": str(root), "fold": "all", "patch_size": [16, 16]})
    with pytest.raises(ValueError, match=r"c2.tif"):
        Trainer(cfg, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoint_latest")


def test_the_model_refuses_non_finite_input_unless_told_not_to_check():
    model = tiny_model().eval()
    x = torch.rand(3, 3, 32, 32)
    x[1, 0, 5, 5] = float("nan")
    x[1, 2, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite input.*image 1: 2 of 3072"):
        model(x)
    model.check_finite = False
    with torch.no_grad():
        out = model(x)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()  # what the check prevents


def test_input_dtypes_integers_are_refused_other_floats_are_cast():
    model = tiny_model().eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        assert torch.allclose(model(x.double()), ref, atol=1e-6)
        assert model(x.double()).dtype == torch.float32
        assert torch.allclose(model(x.bfloat16()), ref, atol=0.1)
    for dtype in (torch.uint8, torch.int64, torch.bool):
        with pytest.raises(ValueError, match=rf"floating-point image, got dtype {dtype}.*\[0, 1\].*model.mean"):
            model((x * 255).to(dtype))


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


def test_a_non_finite_gradient_stops_training(tmp_path):
    run = str(tmp_path / "run")
    with pytest.raises(TrainingDiverged, match=r"loss \d\.\d+ / gradient norm nan.*epoch 1, iteration 1.*no checkpoint yet"):
        _NaNGradient(tiny_train_config(), run).run()
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


def test_save_pretrained_refuses_non_finite_weights(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.head.classifier.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinity.*head.classifier.weight"):
        model.save_pretrained(tmp_path / "m")
    assert not os.path.exists(tmp_path / "m" / "model.safetensors")


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize("section,key,value", [
    ("train", "initial_lr", float("inf")), ("train", "gradient_clip", float("nan")),
    ("train", "weight_decay", float("-inf")), ("train", "warmup_epochs", float("inf")),
    ("model", "decoder", {"dropout": float("nan")}), ("lora", "lora_alpha", float("inf")),
])
def test_every_float_in_the_config_must_be_finite(section, key, value):
    with pytest.raises(ConfigError, match=r"must be a finite number"):
        load_config({section: {key: value}})


@pytest.mark.parametrize("section,key,value,must", [
    ("train", "momentum", 1.0, r"in \[0, 1\)"), ("train", "aux_weight", -1.0, ">= 0"),
    ("train", "poly_exponent", -0.5, ">= 0"), ("lora", "lora_alpha", 0.0, "> 0"),
])
def test_float_ranges(section, key, value, must):
    with pytest.raises(ConfigError, match=rf"{section}.{key}: must be {must}"):
        load_config({section: {key: value}})
    with pytest.raises(ConfigError, match="finite"):
        TrainConfig(initial_lr=float("nan"))  # the dataclasses check themselves too


def test_a_key_given_twice_in_the_yaml_is_an_error_naming_key_and_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  num_epochs: 3\n  seed: 1\n  num_epochs: 30\n")
    with pytest.raises(ConfigError, match=r"c.yaml.*'num_epochs' is given twice \(lines 2 and 4\)"):
        load_config(str(path))
    path.write_text("train:\n  num_epochs: 3\ntrain:\n  seed: 1\n")
    with pytest.raises(ConfigError, match=r"'train' is given twice \(lines 1 and 3\)"):
        load_config(str(path))


# ---------------------------------------------------------------------------- model files
def test_the_weights_checksum_is_recorded_and_verified(tmp_path):
    model = tiny_model()
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    digest, name = (folder / "model.safetensors.sha256").read_text().split()
    assert name == "model.safetensors" and len(digest) == 64
    UperNetViT.from_pretrained(folder)

    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-100] ^= 0x01  # one flipped bit in a weight: safetensors itself loads it without complaint
    (folder / "model.safetensors").write_bytes(bytes(data))
    assert load_file(folder / "model.safetensors").keys() == model.state_dict().keys()
    with pytest.raises(ValueError, match=r"model.safetensors is damaged or was changed.*sha256"):
        UperNetViT.from_pretrained(folder)
    (folder / "model.safetensors.sha256").unlink()  # as written before checksums existed: loads
    UperNetViT.from_pretrained(folder)


def test_a_truncated_weights_file_or_a_mismatched_config_names_the_files(tmp_path):
    folder = tmp_path / "m"
    tiny_model().save_pretrained(folder)
    (folder / "model.safetensors.sha256").unlink()
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read .*model.safetensors.*damaged or truncated"):
        UperNetViT.from_pretrained(folder)

    tiny_model().save_pretrained(folder)
    config = (folder / "config.yaml").read_text()
    (folder / "config.yaml").write_text(config.replace("hidden_size: 32", "hidden_size: 48"))
    with pytest.raises(ValueError, match=r"model.safetensors does not match .*config.yaml: size mismatch"):
        UperNetViT.from_pretrained(folder)


def test_checkpoint_files_that_are_not_checkpoints_are_named_as_such(tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pth").write_text("<html>403 Forbidden</html>")
    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save({"model": {"w": torch.ones(3)}, "args": _Custom()}, tmp_path / "pickled.pth")
    assert torch.equal(read_checkpoint(str(tmp_path / "ok.pt"))["w"], torch.ones(3))
    cases = {
        "half.pt": r"half.pt' is a damaged or truncated torch checkpoint",
        "text.pth": r"text.pth' is not a PyTorch or safetensors checkpoint \(it starts with b'<html>",
        "empty.pth": r"empty.pth' is an empty file",
    }
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message) as info:
            read_checkpoint(str(tmp_path / name))
        assert "trust_checkpoint" not in str(info.value)  # that advice cannot help here
    with pytest.raises(ValueError, match=r"stores Python objects.*_Custom.*trust_checkpoint=True"):
        read_checkpoint(str(tmp_path / "pickled.pth"))
    assert torch.equal(read_checkpoint(str(tmp_path / "pickled.pth"), trust_checkpoint=True)["model"]["w"], torch.ones(3))


class _Custom:
    pass


def test_resume_after_an_architecture_change_names_the_key(tmp_path):
    run = str(tmp_path / "run")
    Trainer(tiny_train_config(train={"num_epochs": 1}), run).run()
    changed = tiny_train_config(train={"num_epochs": 1}, model={"decoder": {"hidden_size": 24}})
    with pytest.raises(ValueError, match=r"config differs .*model.decoder.hidden_size \(16 -> 24\)"):
        Trainer(changed, run, resume=True)


# ---------------------------------------------------------------------------- crashes
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
    from upernet_vit.training import checkpoints, trainer

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
    from upernet_vit.training.predict import resolve_model_dir

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


# ---------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def bare_model(tmp_path_factory):
    """A 1-channel model folder (no preprocessing.json: whole-image inference)."""
    folder = tmp_path_factory.mktemp("model") / "m"
    tiny_model(in_chans=1, num_classes=2).save_pretrained(folder)
    return str(folder)


def _gray(path, value=100):
    Image.fromarray(np.full((20, 24), value, dtype=np.uint8)).save(path)


def _one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith(f"upernet-vit {command}: error: "), err
    return lines[-1]


def test_predict_checks_every_input_before_writing_anything(tmp_path, bare_model, capsys):
    from upernet_vit.cli import main

    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a", "b", "c"):
        _gray(inputs / f"{name}.png")
    _float_tiff(inputs / "z_bad.tif", nan_at=[(1, 1)])  # sorted last: read after the others
    out = tmp_path / "out"
    assert main(["predict", "--model", bare_model, "--input", str(inputs), "--output", str(out), "--device", "cpu"]) == 2
    line = _one_error_line(capsys.readouterr().err, "predict")
    assert "z_bad.tif" in line and "1 non-finite" in line
    assert not out.exists()


def test_predict_output_names_depend_only_on_each_input_name(tmp_path, bare_model):
    from upernet_vit.training.predict import group_input_files, predict

    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("case1_0000", "case2_0000", "photo_0007"):
        _gray(inputs / f"{name}.png")
    names = sorted(group_input_files(str(inputs), 1))
    assert names == ["case1", "case2", "photo_0007"]
    _gray(inputs / "stray name.png")  # used to turn every output name back into the full stem
    assert sorted(group_input_files(str(inputs), 1)) == sorted(names + ["stray name"])
    written = predict(bare_model, str(inputs), str(tmp_path / "out"), device="cpu")
    assert sorted(os.path.basename(p) for p in written) == ["case1.png", "case2.png", "photo_0007.png", "stray name.png"]

    _gray(inputs / "case1.png")  # case1_0000.png and case1.png would both be case1.png
    with pytest.raises(ValueError, match=r"\['case1.png', 'case1_0000.png'\] would all be written as case1.png"):
        group_input_files(str(inputs), 1)


def test_predict_groups_channel_files_and_checks_their_numbering(tmp_path):
    from upernet_vit.training.predict import group_input_files

    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("x_0000", "x_0001", "y_0000", "y_0002"):
        _gray(inputs / f"{name}.png")
    with pytest.raises(ValueError, match=r"'y_0000.png', 'y_0002.png'\] of case 'y' must be numbered"):
        group_input_files(str(inputs), 2)
    (inputs / "y_0002.png").rename(inputs / "y_0001.png")
    Image.fromarray(np.zeros((20, 24, 3), dtype=np.uint8)).save(inputs / "rgb.png")  # 3 channels: too many
    with pytest.raises(ValueError, match=r"case 'rgb' \(rgb.png\) has 3 channel\(s\) but the model takes 2"):
        group_input_files(str(inputs), 2)
    (inputs / "rgb.png").unlink()
    assert group_input_files(str(inputs), 2) == {
        "x": [str(inputs / "x_0000.png"), str(inputs / "x_0001.png")],
        "y": [str(inputs / "y_0000.png"), str(inputs / "y_0001.png")],
    }


def _config_file(tmp_path, **train):
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(dict(TINY_CONFIG, train=dict(TINY_CONFIG["train"], **train))))
    return str(path)


def test_train_into_a_path_under_a_file_is_one_line(tmp_path, capsys):
    from upernet_vit.cli import main

    (tmp_path / "file").write_text("x")
    assert main(["train", _config_file(tmp_path), "--output", str(tmp_path / "file" / "run")]) == 2
    line = _one_error_line(capsys.readouterr().err, "train")
    assert "file/run" in line and "is a file, not a folder" in line


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


def test_debug_prints_the_traceback_and_data_errors_reach_train_log(tmp_path, capsys):
    from upernet_vit.cli import main

    config = _config_file(tmp_path)
    run = tmp_path / "run"
    missing = ["-o", "data.format=folders", "-o", f"data.root={tmp_path / 'nowhere'}"]
    assert main(["train", config, "--output", str(run), *missing]) == 2
    line = _one_error_line(capsys.readouterr().err, "train")
    assert "nowhere" in line and line in (run / "train.log").read_text()
    assert main(["train", config, "--output", str(tmp_path / "run2"), "--debug", *missing]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("upernet-vit train: error:")


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


# ---------------------------------------------------------------------------- labels
def test_label_values_found_without_data_labels_are_logged(tmp_path, caplog):
    import logging

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(2):
        _gray(tmp_path / "images" / f"c{i}.png")
        mask = np.zeros((20, 24), dtype=np.uint8)
        mask[:5] = 255
        Image.fromarray(mask).save(tmp_path / "masks" / f"c{i}.png")
    with caplog.at_level(logging.INFO):
        info, _ = load_folders(str(tmp_path))
    assert info.label_values == [0, 255]
    assert "data.labels is not set" in caplog.text and "0: 720, 255: 240" in caplog.text


def test_a_mask_without_an_image_is_an_error(tmp_path):
    from upernet_vit.training.data import load_nnunet_raw
    from upernet_vit.training.demo_data import write_demo_dataset

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    _gray(tmp_path / "images" / "a.png")
    _gray(tmp_path / "masks" / "a.png", 0)
    _gray(tmp_path / "masks" / "b.png", 0)
    with pytest.raises(FileNotFoundError, match=r"mask .*masks/b.png' has no image in .*images"):
        load_folders(str(tmp_path))
    root = write_demo_dataset(str(tmp_path / "Dataset001_Demo"), num_train=4, num_test=1, size=32)
    os.remove(os.path.join(root, "imagesTr", "demo_001_0000.png"))
    with pytest.raises(FileNotFoundError, match=r"labelsTr/demo_001.png' has no image .*imagesTr/demo_001_0000.png"):
        load_nnunet_raw(root)


# ---------------------------------------------------------------------------- review follow-ups
def test_yaml_merge_keys_may_override_and_non_utf8_files_are_named(tmp_path):
    from upernet_vit.config import read_yaml

    path = tmp_path / "m.yaml"
    path.write_text("base: &b\n  num_epochs: 3\n  seed: 1\ntrain:\n  <<: *b\n  num_epochs: 4\n")
    assert read_yaml(str(path))["train"] == {"num_epochs": 4, "seed": 1}  # an override, not a duplicate
    path.write_bytes(b"train:\n  seed: \xff\n")
    with pytest.raises(ConfigError, match=r"m.yaml: not a UTF-8 text file"):
        read_yaml(str(path))


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
    from upernet_vit.training import checkpoints

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
        if path.endswith(".sha256"):
            raise KeyboardInterrupt  # the process dies here
        real_write(path, write)

    monkeypatch.setattr(pretrained, "atomic_write", crash_at_checksum)
    with pytest.raises(KeyboardInterrupt):
        tiny_model(decoder_channels=32).save_pretrained(folder)  # new weights, same architecture
    assert not (folder / "model.safetensors.sha256").exists()
    UperNetViT.from_pretrained(folder)  # the new weights load; no false "damaged" report


def test_predict_refuses_a_missing_best_and_checks_sizes_and_channels_first(tmp_path):
    from upernet_vit.training.predict import group_input_files, resolve_model_dir

    run = tmp_path / "run"
    tiny_model().save_pretrained(run / "checkpoint_latest")
    (run / "checkpoint_best").mkdir()  # no weights in it: no silent fall-back to latest (issue 16)
    with pytest.raises(ValueError, match=r"has no best checkpoint .*use --checkpoint latest"):
        resolve_model_dir(str(run), "best")

    inputs = tmp_path / "in"
    inputs.mkdir()
    _gray(inputs / "scan_0001.png")
    with pytest.raises(ValueError, match=r"case 'scan' \(scan_0001.png\) has 1 channel\(s\) but the model takes 3"):
        group_input_files(str(inputs), 3)
    (inputs / "scan_0001.png").unlink()
    _gray(inputs / "c_0000.png")
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(inputs / "c_0001.png")
    with pytest.raises(ValueError, match=r"\['c_0000.png', 'c_0001.png'\] of case 'c' differ in size"):
        group_input_files(str(inputs), 2)


def test_a_zip_that_is_not_a_checkpoint_and_fp16_overflow(tmp_path):
    np.savez(tmp_path / "arrays.npz", a=np.ones(3))
    with pytest.raises(ValueError, match=r"arrays.npz' is a zip archive but not a PyTorch checkpoint"):
        read_checkpoint(str(tmp_path / "arrays.npz"))
    model = tiny_model().half()
    with pytest.raises(ValueError, match=r"overflow the model's dtype torch.float16"):
        model(torch.full((1, 3, 32, 32), 1e6))


def test_only_disk_errors_of_the_scratch_file_are_renamed():
    import errno

    from upernet_vit.fileio import as_os_error

    assert as_os_error(OSError("cannot write mode RGBA as JPEG"), "/out/a.png", "/out/.a.tmp") is None  # no errno
    other = OSError(errno.ENOENT, "No such file or directory", "/src/model.safetensors")
    assert as_os_error(other, "/run/checkpoint_best", "/run/checkpoint_best.tmp") is None  # another file
    inside = OSError(errno.ENOSPC, "No space left on device", "/run/checkpoint_best.tmp/model.safetensors")
    assert as_os_error(inside, "/run/checkpoint_best", "/run/checkpoint_best.tmp").filename == "/run/checkpoint_best"
    assert as_os_error(RuntimeError("os error 28"), "/x", "/x.tmp") is None  # only safetensors' own errors
