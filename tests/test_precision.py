"""Precision, one concept (issue 26): ``model.backbone_dtype`` and ``train.amp`` take the same spellings and
store one canonical form; the bfloat16 rule holds in the config and in the Python API alike."""
import pytest
import torch

from upernet_vit import UperNetViT
from upernet_vit.cli import _apply_overrides
from upernet_vit.config import ConfigError, config_to_yaml, load_config
from upernet_vit.precision import Precision, autocast_dtype, canonical_precision
from helpers import TINY

OPTIONS = dict(backbone="vit_small_patch16_224", num_classes=3, in_chans=3, hidden_size=16, backbone_kwargs=dict(TINY))


def test_the_spellings_are_one_list():
    import typing

    from upernet_vit.precision import SPELLINGS, PrecisionName

    assert list(typing.get_args(PrecisionName)) == list(SPELLINGS)  # the config's Literal and the mapping agree
    for odd in ("BF16", None, "half"):  # exact spellings only, as YAML, -o and --amp take them
        with pytest.raises(ValueError, match=r"use one of float32, fp32, none"):
            canonical_precision(odd)


@pytest.mark.parametrize("spellings, canonical", [(("bf16", "bfloat16"), "bfloat16"),
                                                   (("fp16", "float16"), "float16"),
                                                   (("fp32", "float32", "none"), "float32")])
def test_both_keys_take_every_spelling_and_store_the_canonical_one(spellings, canonical):
    for name in spellings:
        config = load_config({"model": {"backbone_dtype": name, "freeze_backbone": True}, "train": {"amp": name}})
        assert config.model.backbone_dtype == canonical and config.train.amp == canonical
        assert load_config(__import__("yaml").safe_load(config_to_yaml(config))) == config  # written canonical
        assert canonical_precision(name) == canonical


def test_a_cli_override_in_the_other_spelling_is_accepted():
    data = _apply_overrides({"model": {"freeze_backbone": True}}, ["model.backbone_dtype=bf16", "train.amp=bfloat16"])
    config = load_config(data)
    assert (config.model.backbone_dtype, config.train.amp) == ("bfloat16", "bfloat16")


def test_an_unknown_precision_names_the_key_and_the_spellings():
    with pytest.raises(ConfigError, match=r"^config: train\.amp: expected one of 'float32', 'fp32', 'none', "
                                          r"'bfloat16', 'bf16', 'float16', 'fp16', got 'half'"):
        load_config({"train": {"amp": "half"}})
    with pytest.raises(ValueError, match=r"^amp 'half': use one of float32, fp32, none, bfloat16, bf16"):
        canonical_precision("half", "amp")


def test_the_precision_object_answers_what_a_run_asks():
    plain, bf16, fp16 = Precision(), Precision("bfloat16", "bfloat16"), Precision(compute="float16")
    assert (plain.compute_dtype, bf16.compute_dtype, fp16.compute_dtype) == (None, torch.bfloat16, torch.float16)
    assert bf16.storage_dtype == torch.bfloat16 and plain.storage_dtype == torch.float32
    assert [p.grad_scaler for p in (plain, bf16, fp16)] == [False, False, True]
    assert [p.activation_bytes for p in (plain, bf16, fp16)] == [4, 2, 2]
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match=r"train\.amp 'float16': float16 \(fp16\) autocast needs CUDA \(device is cpu\)"):
        fp16.check_device(cpu)
    with pytest.raises(ValueError, match=r"backbone_dtype float16 needs a GPU"):
        Precision(storage="float16").check_device(cpu)
    bf16.check_device(cpu)  # bfloat16 runs on the CPU
    assert autocast_dtype("none", cpu) is None and autocast_dtype("bf16", cpu) is torch.bfloat16
    with bf16.autocast(cpu):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    with plain.autocast(cpu):
        assert not torch.is_autocast_enabled("cpu")


def test_a_bfloat16_backbone_is_never_silently_frozen_by_the_api():
    # the config refuses full fine-tuning of a bfloat16 backbone, and so does the API, before any build
    with pytest.raises(ConfigError, match=r"backbone_dtype='bfloat16' stores a backbone that cannot train itself.*"
                                          r"pass freeze_backbone=True \(then model.enable_lora\(\) to adapt it\)"):
        UperNetViT(**OPTIONS, backbone_dtype="bf16")
    with pytest.raises(ConfigError, match=r"model.backbone_dtype bfloat16 stores a backbone that cannot train itself.*"
                                          r"set model.freeze_backbone: true or lora.enabled: true"):
        load_config({"model": {"backbone_dtype": "bf16"}})
    model = UperNetViT(**OPTIONS, backbone_dtype="bf16", freeze_backbone=True)
    assert model.config.backbone_dtype == "bfloat16"
    with pytest.raises(ConfigError, match=r"backbone_dtype='bfloat16' stores a backbone that cannot train itself"):
        model.set_backbone_trainable(True)
    assert not any(p.requires_grad for p in model.backbone.parameters())  # the refusal changed nothing
    model.enable_lora(rank=2)
    model.set_backbone_trainable(True)  # with LoRA: the adapters train, the bfloat16 base does not
    trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    model.merge_lora()  # afterwards the bfloat16 backbone is frozen, and its config says so
    assert model.config.freeze_backbone and not any(p.requires_grad for p in model.backbone.parameters())


def test_from_config_with_lora_freezes_the_bfloat16_base_and_says_so():
    config = {"model": {**OPTIONS, "backbone_dtype": "bf16"}, "lora": {"enabled": True, "r": 2}}
    config["model"]["decoder"] = {"hidden_size": config["model"].pop("hidden_size")}
    model = UperNetViT.from_config(config)
    assert model.config.freeze_backbone and model.lora_enabled
    trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert model.to_config().lora.enabled  # the saved config loads again under the same rule
    load_config(model.to_config().to_dict())


def test_a_bfloat16_model_folder_saved_before_the_rule_loads_frozen(tmp_path):
    """Folders written before the rule hold a bfloat16 backbone without freeze_backbone (e.g. after
    merge_lora); the backbone was frozen then too, and loading says so instead of refusing the folder."""
    import yaml

    model = UperNetViT(**OPTIONS, backbone_dtype="bfloat16", freeze_backbone=True)
    model.save_pretrained(tmp_path / "m")
    config = yaml.safe_load((tmp_path / "m" / "config.yaml").read_text())
    config["model"]["freeze_backbone"] = False
    (tmp_path / "m" / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "m" / "SHA256SUMS").unlink()  # an older folder: no checksums
    loaded = UperNetViT.from_pretrained(tmp_path / "m")
    assert loaded.config.freeze_backbone and not any(p.requires_grad for p in loaded.backbone.parameters())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_merging_lora_into_a_model_cast_to_bfloat16_freezes_it_before_anything_changes():
    model = UperNetViT(**OPTIONS)
    model.enable_lora(rank=2)
    model = model.bfloat16()  # the whole model cast by hand, the config still says float32
    model.merge_lora()
    assert model.lora_config is None and model.config.freeze_backbone
    assert not any(p.requires_grad for p in model.backbone.parameters())
    double = UperNetViT(**OPTIONS).double()
    double.set_backbone_trainable(True)  # float64 is not below float32: it trains
    assert all(p.requires_grad for p in double.backbone.parameters())
