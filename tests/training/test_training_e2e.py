"""End to end on tiny data: train, files, resume, predict, evaluate, CLI, DDP."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from upernet_vit import UperNetViT
from upernet_vit.cli import main
from upernet_vit.config import load_config
from upernet_vit.data.demo import write_demo_dataset
from upernet_vit.data.image_io import read_label
from upernet_vit.inference.evaluate import evaluate
from upernet_vit.training.trainer import Trainer
from helpers import TINY, TINY_CONFIG, tiny_train_config as _config

def test_train_writes_run_folder(tmp_path):
    run = str(tmp_path / "run")
    history = Trainer(_config(), run).run()
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for name in ("config.yaml", "splits_final.json", "metrics.csv", "progress.png"):
        assert os.path.isfile(os.path.join(run, name)), name
    for ckpt in ("checkpoint_latest", "checkpoint_best"):
        assert sorted(os.listdir(os.path.join(run, ckpt))) == [
            "SHA256SUMS", "config.yaml", "model.safetensors", "preprocessing.json", "training_state.pt"
        ]
    assert len(os.listdir(os.path.join(run, "overlays"))) == 2
    with open(os.path.join(run, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    for column in ("epoch", "train_loss", "val_loss", "val_dice_mean", "val_dice_disk", "val_dice_triangle", "ema_dice"):
        assert column in rows[0]
    assert all(np.isfinite(float(r["train_loss"])) for r in rows)
    with open(os.path.join(run, "splits_final.json")) as f:
        splits = json.load(f)
    assert len(splits) == 5 and len(splits[0]["val"]) == 2
    model = UperNetViT.from_pretrained(os.path.join(run, "checkpoint_latest"))
    assert model.num_classes == 4 and model.in_chans == 1
    with pytest.raises(FileExistsError, match="pass resume=True to continue it or choose another output_dir"):
        Trainer(_config(), run)


class _Killed(RuntimeError):
    pass


class _KilledAfterOneEpoch(Trainer):
    def train_epoch(self, epoch):
        if epoch == 1:
            raise _Killed
        return super().train_epoch(epoch)


def test_resume_continues_to_the_same_state(tmp_path):
    straight = str(tmp_path / "straight")
    Trainer(_config(), straight).run()

    interrupted = str(tmp_path / "interrupted")
    with pytest.raises(_Killed):
        _KilledAfterOneEpoch(_config(), interrupted).run()
    resumed = Trainer(_config(), interrupted, resume=True)
    assert resumed.start_epoch == 1
    history = resumed.run()
    assert [h["epoch"] for h in history] == [1, 2, 3]

    a = load_file(os.path.join(straight, "checkpoint_latest", "model.safetensors"))
    b = load_file(os.path.join(interrupted, "checkpoint_latest", "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with open(os.path.join(straight, "metrics.csv")) as f1, open(os.path.join(interrupted, "metrics.csv")) as f2:
        r1, r2 = list(csv.DictReader(f1)), list(csv.DictReader(f2))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]  # noqa: E731
    assert strip(r1) == strip(r2)


def test_resume_refuses_a_changed_config(tmp_path):
    run = str(tmp_path / "run")
    Trainer(_config(train={"num_epochs": 1}), run).run()
    with pytest.raises(ValueError, match=r"data.fold \(0 -> 1\).*run's own config.yaml"):
        Trainer(_config(train={"num_epochs": 1}, data={"fold": 1}), run, resume=True)
    assert Trainer(_config(train={"num_epochs": 1}, data={"num_workers": 1}), run, resume=True).start_epoch == 1


def test_bf16_training_and_layer_decay_run(tmp_path):
    cfg = _config(train={"amp": "bf16", "layer_decay": 0.75, "optimizer": "sgd", "initial_lr": 0.01, "num_epochs": 1})
    trainer = Trainer(cfg, str(tmp_path / "run"))
    scales = sorted({g["lr_scale"] for g in trainer.optimizer.param_groups})
    assert scales[0] == pytest.approx(0.75**5) and scales[-1] == 1.0  # embeddings ... decoder
    assert np.isfinite(trainer.run()[-1]["train_loss"])
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        Trainer(_config(train={"amp": "fp16"}), str(tmp_path / "run2"))


def test_trainer_applies_the_measured_fast_paths_or_the_reference(tmp_path):
    from upernet_vit import FPNFusion
    from upernet_vit.fast import LeanFPNFusion, WinogradConv2d

    fpn = Trainer(_config(), str(tmp_path / "a")).model.head.fpn  # optimize() in training: recompute, no channels_last
    assert type(fpn) is LeanFPNFusion and fpn.fpn_bottleneck.conv.weight.is_contiguous()
    assert type(Trainer(_config(), str(tmp_path / "b"), fast=None).model.head.fpn) is FPNFusion
    winograd = Trainer(_config(), str(tmp_path / "c"), fast={"winograd": True}).model.head.fpn
    assert isinstance(winograd.fpn_bottleneck.conv, WinogradConv2d)


@pytest.fixture(scope="module")
def trained_on_disk(tmp_path_factory):
    """A tiny run on the demo data written as an nnU-Net raw dataset, through the CLI."""
    root = tmp_path_factory.mktemp("e2e")
    dataset = write_demo_dataset(str(root / "Dataset001_Demo"), num_train=10, num_test=3, size=40)
    cfg_path = root / "tiny.yaml"
    cfg = json.loads(json.dumps(TINY_CONFIG))
    cfg["train"]["num_epochs"] = 1
    cfg_path.write_text(yaml.safe_dump(cfg))
    run = str(root / "run")
    code = main(["train", "--config", str(cfg_path), "--data", dataset, "--fold", "0", "--output", run,
                 "-o", "data.num_workers=0"])
    assert code == 0
    return dataset, run


def test_seed_style_cli_trains_on_nnunet_layout(trained_on_disk):
    dataset, run = trained_on_disk
    saved = load_config(os.path.join(run, "config.yaml"))
    assert saved.data.format == "nnunet" and saved.data.root == dataset and saved.data.fold == 0


def test_predict_and_evaluate(trained_on_disk, tmp_path):
    dataset, run = trained_on_disk
    out = str(tmp_path / "pred")
    assert main(["predict", "--model", run, "--input", os.path.join(dataset, "imagesTs"), "--output", out,
                 "--probabilities", "--mirror"]) == 0
    cases = sorted(os.listdir(os.path.join(dataset, "labelsTs")))
    for name in cases:
        mask = read_label(os.path.join(out, name))
        assert mask.shape == (40, 40)
        assert set(np.unique(mask)) <= {0, 1, 2, 3}
        probs = np.load(os.path.join(out, name.replace(".png", "_probs.npz")))["probabilities"]
        assert probs.shape == (4, 40, 40) and np.allclose(probs.astype(np.float32).sum(0), 1, atol=1e-2)
    assert main(["evaluate", "--pred", out, "--gt", os.path.join(dataset, "labelsTs"),
                 "--labels", os.path.join(dataset, "dataset.json")]) == 0
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert set(summary["dice"]) == {"background", "disk", "square", "triangle"}
    assert len(summary["per_case"]) == len(cases)


def test_predict_under_bf16_autocast(trained_on_disk, tmp_path, capsys):
    """bf16 probabilities stay close to fp32 ones (a bf16 mantissa holds ~3 significant digits)."""
    dataset, run = trained_on_disk
    images = os.path.join(dataset, "imagesTs")
    for amp in ("none", "bf16"):
        assert main(["predict", "--model", run, "--input", images, "--output", str(tmp_path / amp),
                     "--probabilities", "--amp", amp]) == 0
    for name in sorted(os.listdir(tmp_path / "none")):
        if name.endswith(".npz"):
            fp32, bf16 = (np.load(tmp_path / amp / name)["probabilities"].astype(np.float32) for amp in ("none", "bf16"))
            assert fp32.shape == bf16.shape and np.abs(fp32 - bf16).max() < 0.05
    assert main(["predict", "--model", run, "--input", images, "--output", str(tmp_path / "x"), "--amp", "fp16",
                 "--device", "cpu"]) == 2
    assert "'fp16': float16 (fp16) autocast needs CUDA (device is cpu)" in capsys.readouterr().err


def test_predict_input_grouping_and_bare_model_folder(tmp_path):
    from PIL import Image

    from upernet_vit.inference.predict import group_input_files, predict

    folder = tmp_path / "plain"
    folder.mkdir()
    for i in (1, 2, 3):
        Image.fromarray(np.full((20, 24), 60 * i, dtype=np.uint8)).save(folder / f"img_{i:04d}.png")
    assert list(group_input_files(str(folder), 1)) == ["img_0001", "img_0002", "img_0003"]
    nn = tmp_path / "nnunet"
    nn.mkdir()
    for channel in (0, 1):
        Image.fromarray(np.zeros((20, 24), dtype=np.uint8)).save(nn / f"case_{channel:04d}.png")
    assert group_input_files(str(nn), 2) == {"case": [str(nn / "case_0000.png"), str(nn / "case_0001.png")]}
    assert len(group_input_files(str(nn), 1)) == 2  # a 1-channel model: two images

    model = UperNetViT("vit_small_patch16_224", None, 3, in_chans=1, hidden_size=8, backbone_kwargs=TINY)
    model.save_pretrained(tmp_path / "bare")  # no preprocessing.json: the user states the scale
    with pytest.raises(FileNotFoundError, match=r"preprocessing.json not found .*give intensity_scale=S"):
        predict(str(tmp_path / "bare"), str(folder), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    written = predict(str(tmp_path / "bare"), str(folder), str(tmp_path / "out"), intensity_scale=255.0)
    assert len(written) == 3 and read_label(written[0]).shape == (20, 24)
    # the reference model (no fast paths) and Winograd give the same masks
    for name, fast in (("reference", None), ("winograd", {"winograd": True})):
        other = predict(str(tmp_path / "bare"), str(folder), str(tmp_path / name), fast=fast, intensity_scale=255.0)
        assert all(np.array_equal(read_label(a), read_label(b)) for a, b in zip(written, other))


def test_evaluate_without_labels_takes_values_from_both_sides(tmp_path):
    from PIL import Image

    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "gt" / "a.png")
    pred = np.zeros((4, 4), dtype=np.uint8)
    pred[0, 0] = 3  # a class the ground truth never has
    Image.fromarray(pred).save(tmp_path / "pred" / "a.png")
    summary = evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"))
    assert summary["dice"]["class_3"] == 0.0 and summary["foreground_mean_case_dice"] == 0.0


def test_evaluate_by_hand(tmp_path):
    from PIL import Image

    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    gt = np.array([[0, 1, 1, 2], [0, 1, 2, 2]], dtype=np.uint8)
    pred = np.array([[0, 1, 0, 2], [1, 1, 2, 0]], dtype=np.uint8)
    Image.fromarray(gt).save(tmp_path / "gt" / "a.png")
    Image.fromarray(pred).save(tmp_path / "pred" / "a.png")
    summary = evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"))
    assert summary["dice"]["class_1"] == pytest.approx(4 / 6)
    assert summary["dice"]["class_2"] == pytest.approx(4 / 5)
    assert summary["foreground_mean_dice"] == pytest.approx((4 / 6 + 4 / 5) / 2)
    assert summary["mean_case_dice"]["class_1"] == pytest.approx(4 / 6)  # one case: both ways agree


def test_cli_reports_config_errors(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  backbone_sise: base\n")
    assert main(["train", str(path)]) == 2
    assert "model.backbone_sise: unknown key; did you mean 'model.backbone_size'" in capsys.readouterr().err


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path):
    cfg = json.loads(json.dumps(TINY_CONFIG))
    cfg["train"]["num_epochs"] = 2
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "upernet_vit", "train", str(path), "--output", str(run), "-o", "data.num_workers=0"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert os.path.isfile(run / "checkpoint_latest" / "model.safetensors")
    assert "done: 2 epochs" in result.stdout and result.stdout.count("done:") == 1  # rank 0 reports once


def test_epochs_without_validation_hold_nan_and_the_last_epoch_validates(tmp_path):
    import csv
    import math

    from helpers import tiny_train_config

    run = str(tmp_path / "run")
    Trainer(tiny_train_config(train={"num_epochs": 3, "val_every": 2}), run).run()
    rows = list(csv.DictReader(open(os.path.join(run, "metrics.csv"))))
    dice = [float(r["val_dice_mean"]) for r in rows]
    assert len(dice) == 3 and math.isnan(dice[0]) and not math.isnan(dice[1]) and not math.isnan(dice[2])
