"""``backbone_dtype`` (issue 18, part 1): a frozen or LoRA backbone stored in bfloat16, the decoder and the
LoRA adapters in float32, features equal to the float32 model's with its backbone cast."""
import pytest
import torch

from upernet_vit import UperNetViT
from upernet_vit.vit_adapter import extract_feature_maps
from helpers import TINY, tiny_backbone_file, tiny_train_config

OPTIONS = dict(backbone="vit_small_patch16_224", num_classes=3, in_chans=3, hidden_size=16, backbone_kwargs=dict(TINY))


def _pair(**extra):
    torch.manual_seed(0)
    stored = UperNetViT(**OPTIONS, backbone_dtype="bfloat16", freeze_backbone=True, **extra).eval()
    torch.manual_seed(0)
    cast = UperNetViT(**OPTIONS, **extra).eval()
    cast.backbone.to(torch.bfloat16)
    return stored, cast


def test_a_bfloat16_backbone_gives_the_features_of_the_cast_float32_model():
    stored, cast = _pair()
    assert {p.dtype for p in stored.backbone.parameters()} == {torch.bfloat16}
    assert {p.dtype for m in (stored.adapter, stored.head, stored.upsampler) for p in m.parameters()} == {torch.float32}
    x = torch.randn(2, 3, 45, 70)
    with torch.no_grad():
        features, reference = stored.backbone_features(x), cast.backbone_features(x)
        by_hand = extract_feature_maps(cast.backbone.vit, cast.pad(x).bfloat16(), cast.feature_indices)
        assert all(f.dtype == torch.float32 for f in features)  # the decoder gets float32 maps
        assert all(torch.equal(a, b) and torch.equal(a, c.float()) for a, b, c in zip(features, reference, by_hand))
        logits = stored(x)
    assert logits.dtype == torch.float32 and logits.shape == (2, 3, 45, 70) and torch.isfinite(logits).all()


def test_lora_adapters_train_in_float32_beside_a_bfloat16_backbone():
    stored, _ = _pair()
    assert not any(p.requires_grad for p in stored.backbone.parameters())  # bf16 storage does not train itself
    stored.enable_lora(rank=2)
    trainable = {n: p for n, p in stored.backbone.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    stored.train()
    stored(torch.randn(2, 3, 32, 32)).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values())
    assert all(p.grad is None for n, p in stored.backbone.named_parameters() if "lora_" not in n)


def test_save_and_load_keep_the_storage_dtype(tmp_path):
    stored, _ = _pair()
    stored.save_pretrained(tmp_path / "m")
    loaded = UperNetViT.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.backbone_dtype == "bfloat16"
    assert next(loaded.backbone.parameters()).dtype == torch.bfloat16
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), stored(x))


def test_dtypes_a_device_or_the_training_cannot_use_are_one_line_errors(tmp_path):
    from upernet_vit.training.trainer import Trainer

    with pytest.raises(ValueError, match=r"backbone_dtype float16 needs a GPU; on the CPU use bfloat16 or float32"):
        UperNetViT(**OPTIONS, backbone_dtype="float16", freeze_backbone=True).check_device(torch.device("cpu"))
    UperNetViT(**OPTIONS, backbone_dtype="bfloat16", freeze_backbone=True).check_device(torch.device("cpu"))
    with pytest.raises(ValueError, match=r"backbone_dtype bfloat16 stores a backbone that cannot train itself "
                                         r"\(.*\): set model.freeze_backbone: true or lora.enabled: true"):
        Trainer(tiny_train_config(model={"backbone_dtype": "bfloat16"}), str(tmp_path / "run"))
    # issue 25: a frozen bfloat16 backbone without weights (the 7B recipe before its download) is refused
    # before anything is built: it was built in float32 first and killed for memory, without a word
    config = tiny_train_config(model={"backbone_dtype": "bfloat16"}, lora={"enabled": True})
    with pytest.raises(ValueError, match=r"keeps the backbone frozen, but it has no weights \(model.checkpoint_path is "
                                         r"empty and model.pretrained is false\).*Set model.checkpoint_path"):
        Trainer(config, str(tmp_path / "run2"))
    assert not (tmp_path / "run2").exists()


def test_bfloat16_on_a_gpu_without_it_is_a_one_line_error(monkeypatch):
    # no GPU here: the card is one whose capability check says no (a pre-Ampere card, e.g. a V100 or T4)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100-SXM2-16GB")
    model = UperNetViT(**OPTIONS, backbone_dtype="bfloat16", freeze_backbone=True)
    with pytest.raises(ValueError, match=r"^model.backbone_dtype bfloat16: Tesla V100-SXM2-16GB has no bfloat16 "
                                         r"support; use float16 or float32$"):
        model.check_device(torch.device("cuda", 0))
    UperNetViT(**OPTIONS, backbone_dtype="float16", freeze_backbone=True).check_device(torch.device("cuda", 0))


def test_a_lora_run_with_a_bfloat16_backbone_trains_and_predicts(tmp_path):
    from upernet_vit.training.trainer import Trainer

    config = tiny_train_config(model={"backbone_dtype": "bfloat16", "checkpoint_path": tiny_backbone_file(tmp_path)},
                               lora={"enabled": True, "r": 2}, train={"num_epochs": 1})
    history = Trainer(config, str(tmp_path / "run")).run()
    assert len(history) == 1 and torch.isfinite(torch.tensor(history[0]["train_loss"]))
    loaded = UperNetViT.from_pretrained(tmp_path / "run" / "checkpoint_latest")
    assert next(p for n, p in loaded.backbone.named_parameters() if "lora_" not in n).dtype == torch.bfloat16
