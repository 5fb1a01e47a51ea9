"""train.distributed: fsdp (torch's FSDP2) on the CPU: two gloo processes under torchrun, checked against DDP's
run of the same config (the same per-rank batches, so the same gradients; one process differs through the
batch Dice), resumed, and in bf16 with LoRA; one process without torchrun."""
import csv
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from upernet_vit import UperNetViT
from upernet_vit.training.fsdp import vit_blocks
from upernet_vit.training.trainer import Trainer
from helpers import TINY_CONFIG, tiny_model, tiny_train_config

# 15 demo cases: 3 validation cases, so the 2 ranks validate 2 and 1 images (FSDP's forward is collective:
# without the full weights in validation the ranks would wait on each other for ever); a gradient_clip
# below the tiny model's gradient norm (about 2), so clipping of sharded gradients is exercised
TWO_EPOCHS = {"train": {"num_epochs": 2, "gradient_clip": 0.5, "distributed": "fsdp"}, "data": {"demo_cases": 15}}

# a torchrun script that trains like `upernet-vit train` but stops (every rank, cleanly) before epoch 2
STOP_AFTER_ONE_EPOCH = """
import sys
from upernet_vit.config import load_config
from upernet_vit.training.trainer import Trainer

class Stop(Trainer):
    def train_epoch(self, epoch):
        if epoch == 1:
            raise SystemExit(0)
        return super().train_epoch(epoch)

Stop(load_config(sys.argv[1]), sys.argv[2]).run()
"""


def _config_file(folder, updates):
    cfg = json.loads(json.dumps(TINY_CONFIG))
    for section, values in updates.items():
        cfg.setdefault(section, {}).update(values)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _torchrun(args, timeout=120):
    """``torchrun --standalone --nproc_per_node 2 args``, finished (stdout: the report, stderr: the log).
    The timeout fails a hang quickly."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _train(folder, updates, *extra):
    """A 2-process ``upernet-vit train`` of :data:`TINY_CONFIG` with ``updates`` into ``folder/run``."""
    folder.mkdir(exist_ok=True)
    run = folder / "run"
    return run, _torchrun(["-m", "upernet_vit", "train", _config_file(folder, updates), "--output", str(run), *extra])


def _weights(run):
    return load_file(os.path.join(run, "checkpoint_latest", "model.safetensors"))


def _rows(run):
    with open(os.path.join(run, "metrics.csv")) as f:
        return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in csv.DictReader(f)]


def _optimizer(run):
    return torch.load(os.path.join(run, "checkpoint_latest", "training_state.pt"), weights_only=True)["optimizer"]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """The 2-epoch FSDP run of :data:`TWO_EPOCHS` and its finished process."""
    return _train(tmp_path_factory.mktemp("fsdp"), TWO_EPOCHS)


@pytest.mark.slow
def test_fsdp_matches_ddp_two_processes_gloo(fsdp_run, tmp_path):
    run, result = fsdp_run
    assert "done: 2 epochs" in result.stdout and result.stdout.count("done:") == 1  # rank 0 reports once
    assert "fsdp: 4 blocks and the root sharded across 2 processes" in result.stderr
    ddp, _ = _train(tmp_path, {**TWO_EPOCHS, "train": {**TWO_EPOCHS["train"], "distributed": "ddp"}})

    sharded, whole = _weights(run), _weights(ddp)
    assert sharded.keys() == whole.keys()
    for key in whole:
        torch.testing.assert_close(sharded[key], whole[key], rtol=1e-5, atol=1e-6, msg=key)
    model = UperNetViT.from_pretrained(os.path.join(run, "checkpoint_latest"))  # the one-process model folder
    assert model.num_classes == 4 and model.preprocessing["patch_size"] == [32, 32]

    a, b = _optimizer(run), _optimizer(ddp)  # numbered as one process numbers it
    assert all(float(s["step"]) == 4 for s in a["state"].values())  # 2 epochs of 2 iterations
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for index, state in b["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(a["state"][index][name], value, rtol=1e-5, atol=1e-7)

    rows, expected = _rows(run), _rows(ddp)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for row, other in zip(rows, expected):
        assert row.keys() == other.keys()
        for key in row:
            assert float(row[key]) == pytest.approx(float(other[key]), rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_fsdp_resume_continues_to_the_same_state(fsdp_run, tmp_path):
    straight, _ = fsdp_run
    config = _config_file(tmp_path, TWO_EPOCHS)
    run = tmp_path / "run"
    script = tmp_path / "stop.py"
    script.write_text(STOP_AFTER_ONE_EPOCH)
    _torchrun([str(script), config, str(run)])
    assert [r["epoch"] for r in _rows(run)] == ["1"]
    shutil.copytree(run, tmp_path / "alone")
    result = _torchrun(["-m", "upernet_vit", "train", config, "--output", str(run), "--resume"])
    assert "done: 2 epochs" in result.stdout

    a, b = _weights(straight), _weights(run)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7, msg=key)
    assert _rows(run) == _rows(straight)

    # the checkpoint is a one-process one: a single process resumes it too, also as ddp (other numbers: its
    # batch Dice is over both images of the global batch)
    alone = Trainer(tiny_train_config(**{**TWO_EPOCHS, "train": {**TWO_EPOCHS["train"], "distributed": "ddp"}}),
                    str(tmp_path / "alone"), resume=True)
    assert alone.start_epoch == 1
    assert [r["epoch"] for r in alone.run()] == [1, 2]


@pytest.mark.slow
def test_fsdp_bf16_lora_two_processes(tmp_path):
    """bf16 gathers of the blocks (MixedPrecisionPolicy) and LoRA's peft wrapper around the sharded blocks,
    against DDP under bf16 autocast: the same up to the blocks' bfloat16 residual stream."""
    updates = {"train": {"num_epochs": 1, "amp": "bf16", "distributed": "fsdp"}, "lora": {"enabled": True}}
    run, result = _train(tmp_path / "fsdp", updates)
    assert "sharded across 2 processes (blocks' weights in torch.bfloat16 in compute)" in result.stderr
    ddp, _ = _train(tmp_path / "ddp", {**updates, "train": {**updates["train"], "distributed": "ddp"}})
    (row,), (expected,) = _rows(run), _rows(ddp)
    for key in ("train_loss", "val_loss", "val_dice_mean"):
        assert float(row[key]) == pytest.approx(float(expected[key]), rel=2e-2, abs=2e-3), key
    sharded, whole = _weights(run), _weights(ddp)
    assert all(v.dtype == torch.float32 for v in sharded.values())  # the float32 shards, not bf16 copies
    # AdamW's first steps move each weight by about the learning rate whatever its gradient's size, so a tiny
    # gradient whose sign bfloat16 rounding flips moves that weight the other way: compare means, not maxima
    for key in whole:
        assert (sharded[key] - whole[key]).abs().mean() < 5e-4, key
    model = UperNetViT.from_pretrained(os.path.join(run, "checkpoint_latest"))
    assert model.lora_enabled


def test_vit_blocks_are_found_inside_a_lora_wrapper():
    model = tiny_model()
    plain = vit_blocks(model)
    model.enable_lora()
    wrapped = vit_blocks(model)
    assert len(plain) == len(wrapped) == 4
    assert all(type(b).__name__ == "Block" for b in wrapped)
    assert wrapped[0] is model.backbone.vit.model.blocks[0]


def test_fsdp_in_one_process_trains_as_without_it(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="upernet_vit.training.trainer"):
        Trainer(tiny_train_config(train={"num_epochs": 1, "distributed": "fsdp"}), str(tmp_path / "fsdp")).run()
    assert "fsdp shards only under torchrun" in caplog.text
    Trainer(tiny_train_config(train={"num_epochs": 1}), str(tmp_path / "ddp")).run()
    a, b = _weights(tmp_path / "fsdp"), _weights(tmp_path / "ddp")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_refuses_fp16(tmp_path):
    with pytest.raises(ValueError, match="amp fp16 does not work with train.distributed fsdp.*use train.amp bf16"):
        Trainer(tiny_train_config(train={"distributed": "fsdp", "amp": "fp16"}), str(tmp_path / "run"))
