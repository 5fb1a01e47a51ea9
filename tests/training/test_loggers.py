"""train.logger: TensorBoard event files (read back with tensorboard's own reader) and the W&B calls."""
import csv
import os
import sys
import types

import numpy as np
import pytest

from upernet_vit.training.trainer import Trainer
from helpers import tiny_train_config


def _metrics(run):
    with open(os.path.join(run, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def test_tensorboard_event_files_hold_the_metrics_and_overlays(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = str(tmp_path / "run")
    Trainer(tiny_train_config(train={"logger": "tensorboard"}), run).run()
    events = EventAccumulator(os.path.join(run, "tensorboard"), size_guidance={"images": 0}).Reload()
    rows = _metrics(run)
    for tag, column in (("train/loss", "train_loss"), ("val/loss", "val_loss"), ("val/dice_disk", "val_dice_disk"),
                        ("val/iou_mean", "val_iou_mean"), ("epoch/lr", "lr"), ("epoch/ema_dice", "ema_dice")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2, 3], tag
        assert [s.value for s in scalars] == pytest.approx([float(r[column]) for r in rows], rel=1e-6), tag
    overlays = [t for t in events.Tags()["images"] if t.startswith("overlays/")]
    assert len(overlays) == 2 and events.Images(overlays[0])[0].step == 3  # num_overlays, at the last epoch


class _FakeWandb(types.ModuleType):
    """Records what the logger sends; stands in for the wandb package (the test checks our calls)."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0
        fake = self

        class Run:
            def log(self, values, step):
                fake.logged.append((step, dict(values)))

            def finish(self):
                fake.finished += 1

        self.Run = Run
        self.Image = lambda array: ("image", np.asarray(array).shape)

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self.Run()


def test_wandb_gets_every_epoch_row_and_a_resumed_run_keeps_its_id(tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = str(tmp_path / "run")
    Trainer(tiny_train_config(train={"logger": "wandb", "num_epochs": 2}), run).run()
    (init,) = fake.inits
    assert init["project"] == "upernet-vit" and init["name"] == "run" and init["config"]["train"]["num_epochs"] == 2
    scalars = [(step, values) for step, values in fake.logged if "train/loss" in values]
    assert [step for step, _ in scalars] == [1, 2]
    assert [v["train/loss"] for _, v in scalars] == pytest.approx([float(r["train_loss"]) for r in _metrics(run)])
    images = [values for _, values in fake.logged if any(k.startswith("overlays/") for k in values)]
    assert len(images) == 1 and all(v[0] == "image" and v[1][2] == 3 for v in images[0].values())
    assert fake.finished == 1

    Trainer(tiny_train_config(train={"logger": "wandb", "num_epochs": 2}), run, resume=True).release()
    assert fake.inits[1]["id"] == init["id"] and fake.inits[1]["resume"] == "allow"


def test_the_real_wandb_package_offline_records_every_metric_and_the_overlays(tmp_path, monkeypatch):
    import glob

    from PIL import Image

    # offline: wandb writes its run file locally and never connects; its own folders go to tmp_path
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                       "WANDB_CONFIG_DIR": tmp_path / "cfg", "WANDB_CACHE_DIR": tmp_path / "cache",
                       "WANDB_DATA_DIR": tmp_path / "data"}.items():
        monkeypatch.setenv(var, str(value))
    run = str(tmp_path / "run")
    Trainer(tiny_train_config(train={"logger": "wandb", "num_epochs": 2}), run).run()
    with open(os.path.join(run, "wandb_run_id.txt")) as f:
        run_id = f.read().strip()
    (folder,) = glob.glob(os.path.join(run, "wandb", f"offline-run-*-{run_id}"))
    with open(os.path.join(folder, f"run-{run_id}.wandb"), "rb") as f:
        record = f.read()  # protobuf records: the metric names are stored as plain strings
    for key in ("train/loss", "val/loss", "val/dice_disk", "val/dice_mean", "val/iou_mean", "epoch/lr",
                "epoch/ema_dice", "overlays/demo_000"):
        assert key.encode() in record, key
    pngs = sorted(glob.glob(os.path.join(folder, "files", "media", "images", "overlays", "*.png")))
    assert len(pngs) == 2  # num_overlays, logged at the last epoch
    with Image.open(pngs[0]) as image:
        assert image.mode == "RGB" and min(image.size) > 0


def test_a_missing_logger_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    with pytest.raises(ImportError, match=r'pip install -e "\.\[wandb\]" in the checkout'):
        Trainer(tiny_train_config(train={"logger": "wandb"}), str(tmp_path / "run"))
