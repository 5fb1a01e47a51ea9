"""The loop and its strategies (issue 26): one object per way of running, no branch on it in trainer.py;
the model's input check runs once per image at read time under the trainer."""
import ast
import pathlib

import pytest
import torch

from upernet_vit.config import load_config
from upernet_vit.precision import Precision
from upernet_vit.training import strategies
from upernet_vit.training.memory import MemoryEstimate
from upernet_vit.training.trainer import Trainer
from helpers import tiny_train_config

TRAINER = pathlib.Path(strategies.__file__).with_name("trainer.py")


def test_the_trainer_has_no_branch_on_the_way_of_running():
    names = {n.id for n in ast.walk(ast.parse(TRAINER.read_text())) if isinstance(n, ast.Name)}
    attributes = {n.attr for n in ast.walk(ast.parse(TRAINER.read_text())) if isinstance(n, ast.Attribute)}
    strings = [n.value for n in ast.walk(ast.parse(TRAINER.read_text()))
               if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    words = {w.lower() for w in names | attributes}
    assert not {w for w in words if "fsdp" in w or "ddp" in w or w == "distributed"}
    assert not [s for s in strings if s in ("fsdp", "ddp")]  # no `== "fsdp"` either


@pytest.mark.parametrize("world, distributed, kind", [(None, "ddp", "OneProcess"), (None, "fsdp", "OneProcess"),
                                                      ("2", "ddp", "DDP"), ("2", "fsdp", "FSDP")])
def test_the_strategy_follows_the_config_and_torchrun(world, distributed, kind, monkeypatch):
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    train = load_config({"train": {"distributed": distributed}}).train
    strategy = strategies.create_strategy(train, Precision())
    assert type(strategy).__name__ == kind  # created, not started: no process group exists
    assert not torch.distributed.is_initialized()
    if kind == "OneProcess" and distributed == "fsdp":
        assert "fsdp shards only under torchrun" in strategy.note


def test_fsdp_with_fp16_is_refused_before_any_group_starts(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    train = load_config({"train": {"distributed": "fsdp", "amp": "fp16"}}).train
    with pytest.raises(ValueError, match=r"train.amp fp16 does not work with train.distributed fsdp"):
        strategies.create_strategy(train, Precision(compute="float16"))


def test_each_strategy_counts_its_share_of_the_memory():
    whole = MemoryEstimate(weights=1000, optimizer=3000, activations=500)
    assert strategies.OneProcess(Precision()).per_process(whole) == whole
    fsdp = strategies.FSDP(Precision())
    fsdp.info.world_size = 4
    # a quarter of the weights and optimizer state, plus the whole weights gathered for evaluation
    assert fsdp.per_process(whole) == MemoryEstimate(weights=250 + 1000, optimizer=750, activations=500)


def test_under_the_trainer_images_are_checked_at_read_not_on_every_forward(tmp_path, monkeypatch):
    trainer = Trainer(tiny_train_config(train={"num_epochs": 1}), str(tmp_path / "run"))
    assert trainer.model.check_finite is False
    shapes = []
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda x: shapes.append(tuple(x.shape)) or real(x))
    trainer.train_epoch(0)
    assert shapes and not [s for s in shapes if len(s) == 4]  # the loss and gradient norm only, no image batch
    trainer.release()
    assert trainer.model.check_finite is True  # whoever keeps the model gets the check back
