"""Test-time augmentation (scales, flips), ensembles of runs, and the checkpoint a run folder gives."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from upernet_vit.cli import main
from upernet_vit.runs.checkpoints import checkpoint_epoch
from upernet_vit.inference.sliding_window import sliding_window_logits, tta_probabilities
from upernet_vit.inference.predict import predict
from upernet_vit.runs.checkpoints import resolve_model_dir
from upernet_vit.training.trainer import Trainer
from helpers import tiny_model, tiny_train_config


def test_tta_at_scale_one_is_the_plain_prediction_and_scales_average_resized_probabilities():
    model = tiny_model(in_chans=1).eval()
    image = torch.rand(1, 40, 56)
    plain = sliding_window_logits(model, image, [32, 32]).softmax(0)
    assert torch.equal(tta_probabilities(model, image, [32, 32], [1.0]), plain)

    half = F.interpolate(image[None], size=(20, 28), mode="bilinear", align_corners=False, antialias=True)[0]
    small = sliding_window_logits(model, half, [32, 32]).softmax(0)
    back = F.interpolate(small[None], size=(40, 56), mode="bilinear", align_corners=False)[0]
    both = tta_probabilities(model, image, [32, 32], [0.5, 1.0])
    assert torch.allclose(both, (back + plain) / 2, atol=1e-6)
    assert torch.allclose(both.sum(0), torch.ones(40, 56), atol=1e-5)  # still probabilities
    with pytest.raises(ValueError, match=r"^scales=\[0\]: give one or more factors in \[0.25, 4\]"):
        tta_probabilities(model, image, [32, 32], [0.0])


class _ScriptedDice(Trainer):
    """Validation Dice by epoch (a tiny model learns too little to rank epochs): best = epoch 1."""

    def validate(self, write_overlays=False):
        return {"dice_mean": [0.3, 0.2, 0.1][len(self.history)]}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    runs = []
    for seed in (1, 2):
        run = str(root / f"run{seed}")
        _ScriptedDice(tiny_train_config(train={"seed": seed}), run).run()
        runs.append(run)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (36, 44), dtype=np.uint8)).save(images / f"{name}.png")
    return runs, str(images)


def test_checkpoint_choice_is_honoured(two_runs, tmp_path):
    (run, _), images = two_runs
    assert resolve_model_dir(run) == os.path.join(run, "checkpoint_latest")  # final: the default
    assert checkpoint_epoch(resolve_model_dir(run, "final")) == 3
    assert checkpoint_epoch(resolve_model_dir(run, "best")) == 1
    assert checkpoint_epoch(resolve_model_dir(run, "latest")) == 3
    outputs = {}
    for which in ("final", "best"):
        out = tmp_path / which
        assert main(["predict", "--model", run, "--checkpoint", which, "--input", images, "--output", str(out),
                     "--probabilities", "--device", "cpu"]) == 0
        outputs[which] = np.load(out / "a_probs.npz")["probabilities"]
    assert not np.array_equal(outputs["final"], outputs["best"])  # different weights, different maps


def test_an_unfinished_run_has_no_final_checkpoint(tmp_path):
    class StopAfterOne(Trainer):
        def train_epoch(self, epoch):
            if epoch == 1:
                raise KeyboardInterrupt
            return super().train_epoch(epoch)

    run = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        StopAfterOne(tiny_train_config(), run).run()
    with pytest.raises(ValueError, match=r"stopped at epoch 1 of 3: it has no final checkpoint.*checkpoint='latest'"):
        resolve_model_dir(run)
    assert checkpoint_epoch(resolve_model_dir(run, "latest")) == 1


def test_an_ensemble_averages_the_probabilities_of_its_runs(two_runs, tmp_path):
    runs, images = two_runs
    single = []
    for i, run in enumerate(runs):
        predict(run, images, str(tmp_path / f"single{i}"), device="cpu", save_probabilities=True)
        single.append(np.load(tmp_path / f"single{i}" / "a_probs.npz")["probabilities"].astype(np.float32))
    assert main(["predict", "--model", *runs, "--input", images, "--output", str(tmp_path / "ensemble"),
                 "--probabilities", "--device", "cpu"]) == 0
    ensemble = np.load(tmp_path / "ensemble" / "a_probs.npz")["probabilities"].astype(np.float32)
    assert np.abs(ensemble - (single[0] + single[1]) / 2).max() < 2e-3  # float16 files
    assert not np.allclose(single[0], single[1], atol=1e-2)  # the two runs differ


def test_an_ensemble_of_runs_with_other_labels_is_an_error(two_runs, tmp_path):
    runs, images = two_runs
    other = tmp_path / "other"
    tiny_model(in_chans=1, num_classes=3).save_pretrained(other)  # labels 0..2, not the demo's 0..3
    with pytest.raises(ValueError, match=r"same labels, input channels and slicing.*\[0, 1, 2, 3\].*\[0, 1, 2\]"):
        predict([runs[0], str(other)], images, str(tmp_path / "out"), device="cpu", intensity_scale=255.0)
    assert not (tmp_path / "out").exists()


def test_validation_can_use_multi_scale_tta(tmp_path):
    trainer = Trainer(tiny_train_config(train={"num_epochs": 1, "val_scales": [0.75, 1.0], "val_mirror": True}),
                      str(tmp_path / "run"))
    metrics = trainer.validate()
    assert 0 <= metrics["dice_mean"] <= 1
    trainer.release()
