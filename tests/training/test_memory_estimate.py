"""The memory estimate before training (issue 18): its parts follow the settings, and a run that will not
fit is refused with the settings to change, not the allocator's message."""
import logging

import pytest
import torch

from upernet_vit import UperNetViT
from upernet_vit.training.memory import check_fits, estimate_training_memory
from helpers import TINY, tiny_train_config

OPTIONS = dict(backbone="vit_small_patch16_224", num_classes=3, in_chans=3, hidden_size=16, backbone_kwargs=dict(TINY))


def test_the_parts_follow_the_settings():
    model = UperNetViT(**OPTIONS)
    base = estimate_training_memory(model, batch_size=2, patch_size=(64, 64))
    assert base.weights == sum(p.numel() * 4 for p in model.parameters())
    assert base.optimizer == sum(p.numel() for p in model.parameters()) * 4 * 3  # grad + AdamW's two moments
    assert estimate_training_memory(model, 4, (64, 64)).activations == 2 * base.activations
    assert estimate_training_memory(model, 2, (64, 64), amp="bf16").activations == base.activations // 2
    assert estimate_training_memory(model, 2, (128, 128)).activations > 3 * base.activations
    assert estimate_training_memory(model, 2, (64, 64), optimizer="sgd").optimizer == base.optimizer * 2 // 3
    vitdet = estimate_training_memory(UperNetViT(**OPTIONS, pyramid="vitdet"), 2, (64, 64))
    assert vitdet.activations != base.activations and vitdet.weights != base.weights
    checkpointed = estimate_training_memory(UperNetViT(**OPTIONS, gradient_checkpointing=True), 2, (64, 64))
    assert checkpointed.activations < base.activations and checkpointed.weights == base.weights
    lora = UperNetViT(**OPTIONS, backbone_dtype="bfloat16", freeze_backbone=True)
    lora.enable_lora(rank=2)
    small = estimate_training_memory(lora, 2, (64, 64))
    assert small.weights < base.weights and small.optimizer < base.optimizer / 2


def test_a_run_that_will_not_fit_names_the_settings_to_change(tmp_path, monkeypatch):
    from upernet_vit.training import memory
    from upernet_vit.training.trainer import Trainer

    monkeypatch.setattr(memory, "available_memory", lambda device: 1 << 20)  # a 1 MB device
    with pytest.raises(ValueError) as info:
        Trainer(tiny_train_config(), str(tmp_path / "run"))
    message = str(info.value)
    assert message.startswith("this run needs about ") and "but the device has 0.0 GB; change: " in message
    for setting in ("model.gradient_checkpointing: true", "lora.enabled: true or model.freeze_backbone: true",
                    "a smaller data.batch_size or data.patch_size"):
        assert setting in message
    assert "backbone_dtype" not in message  # only for a backbone that does not train
    assert not (tmp_path / "run").exists()  # refused before the run folder is made
    Trainer(tiny_train_config(train={"check_memory": False}), str(tmp_path / "unchecked")).release()

    frozen = UperNetViT(**OPTIONS, freeze_backbone=True, gradient_checkpointing=True)
    with pytest.raises(ValueError, match=r"change: model.backbone_dtype: bfloat16 .*; a smaller data.batch_size"):
        check_fits(estimate_training_memory(frozen, 2, (64, 64)), 1 << 10, frozen, lora=False)
    check_fits(estimate_training_memory(frozen, 2, (64, 64)), 1 << 40, frozen, lora=False)  # fits: no error
    check_fits(estimate_training_memory(frozen, 2, (64, 64)), None, frozen, lora=False)  # unknown: no check
    assert torch.cuda.is_available() or memory.available_memory(torch.device("cpu")) is not None


def test_a_run_near_the_limit_is_warned_of_with_the_settings_to_change(caplog):
    from upernet_vit.training.memory import NEAR_LIMIT

    model = UperNetViT(**OPTIONS)
    estimate = estimate_training_memory(model, 2, (64, 64))
    with caplog.at_level(logging.WARNING, logger="upernet_vit.training.memory"):
        check_fits(estimate, int(estimate.total / ((1 + NEAR_LIMIT) / 2)), model, lora=False)  # runs, warned
        assert len(caplog.records) == 1
        message = caplog.records[0].getMessage()
        assert message.startswith("this run needs about ") and "the run may run out of memory" in message
        assert "model.gradient_checkpointing: true" in message and "a smaller data.batch_size" in message
        caplog.clear()
        check_fits(estimate, int(estimate.total / NEAR_LIMIT) + 1, model, lora=False)  # clear of the band: quiet
        assert not caplog.records
    with pytest.raises(ValueError, match="but the device has"):
        check_fits(estimate, estimate.total - 1, model, lora=False)


def test_the_check_may_be_switched_off_at_resume(tmp_path):
    """``train.check_memory`` changes nothing that is computed, so a run resumes with it changed."""
    from upernet_vit.training.trainer import Trainer

    Trainer(tiny_train_config(train={"num_epochs": 1}), str(tmp_path / "run")).run()
    resumed = Trainer(tiny_train_config(train={"num_epochs": 1, "check_memory": False}), str(tmp_path / "run"),
                      resume=True)
    assert resumed.start_epoch == 1
    resumed.release()
