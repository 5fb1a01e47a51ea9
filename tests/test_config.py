"""YAML configs: shipped recipes load, errors name the dotted key and the closest valid one."""
import glob
import os

import pytest

from upernet_vit import ConfigError, UperNetViT, load_config
from upernet_vit.config import Config, save_config
from helpers import TINY

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "upernet_vit", "recipes")


def test_seed_recipe_loads_with_its_meaning():
    cfg = load_config(os.path.join(CONFIG_DIR, "upernet.yaml"))
    assert (cfg.model.backbone, cfg.model.backbone_size) == ("dinov3", "large")
    assert cfg.model.decoder.hidden_size == 512 and cfg.model.decoder.pool_scales == [1, 2, 3, 6]
    assert cfg.lora.enabled is False and cfg.lora.r == 8 and cfg.lora.lora_alpha == 16.0
    assert cfg.lora.target_modules == ["qkv"] and cfg.lora.lora_dropout == 0.05
    assert cfg.train.initial_lr == 1e-3 and cfg.train.weight_decay == 3e-5 and cfg.train.gradient_clip == 12.0
    assert (cfg.train.num_epochs, cfg.train.num_iterations_per_epoch, cfg.train.num_val_iterations_per_epoch) == (
        1000, 250, 50
    )


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))))
def test_every_shipped_config_builds_a_model(path):
    """Each recipe builds (shrunk to a tiny ViT via backbone_kwargs so the test stays fast)."""
    cfg = load_config(path)
    cfg.model.backbone_kwargs = dict(TINY)
    cfg.model.decoder.hidden_size = 16
    model = UperNetViT.from_config(cfg, num_classes=2)
    assert model.lora_enabled == cfg.lora.enabled
    assert model.backbone.name.startswith("vit_")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"model": {"decoder": {"hiden_size": 3}}}, r"model\.decoder\.hiden_size: unknown key; did you mean 'model\.decoder\.hidden_size'"),
        ({"modle": {}}, r"modle: unknown key; did you mean 'model'"),
        ({"model": {"decoder": {"hidden_size": "big"}}}, r"model\.decoder\.hidden_size: expected an integer, got 'big'"),
        ({"model": {"decoder": {"pool_scales": [1, 2.5]}}}, r"model\.decoder\.pool_scales\[1\]: expected an integer"),
        ({"lora": {"enabled": "yes"}}, r"lora\.enabled: expected true/false"),
        ({"model": {"decoder": {"norm": "batchnrom"}}}, r"did you mean 'batchnorm'"),
        ({"train": {"initial_lr": True}}, r"train\.initial_lr: expected a number"),
        ({"model": {"num_classes": "3"}}, r"model\.num_classes: expected an integer or null"),
        ({"model": {"decoder": {"hidden_size": 0}}}, r"model\.decoder\.hidden_size: must be >= 1, got 0"),
        ({"model": {"decoder": {"pool_scales": []}}}, r"model\.decoder\.pool_scales: must be a non-empty list"),
        ({"model": {"decoder": {"dropout": 1.5}}}, r"model\.decoder\.dropout: must be in \[0, 1\)"),
        ({"model": {"feature_indices": [1, 2]}}, r"model\.feature_indices: must be 4 block indices"),
        ({"model": {"feature_indices": [1, "a", 3, 4]}}, r"model\.feature_indices\[1\]: expected an integer"),
        ({"lora": {"r": 0}}, r"lora\.r: must be >= 1"),
        ({"data": {"patch_size": [64]}}, r"data\.patch_size: must be \[height, width\]"),
        ({"data": {"fold": "last"}}, r"data\.fold: expected an integer or one of 'all'"),
        ({"train": {"distributed": "fdsp"}},
         r"^config: train\.distributed: expected one of 'ddp', 'fsdp', got 'fdsp' \(did you mean 'fsdp'\?\)$"),
    ],
)
def test_config_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        load_config(data)


def test_yaml_quirks(tmp_path):
    """PyYAML reads 1e-3 as a string; an empty section (comments only) means defaults."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  initial_lr: 1e-3\nlora:\n  # nothing yet\n")
    cfg = load_config(str(path))
    assert cfg.train.initial_lr == 0.001 and cfg.lora.r == 8


def test_error_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  backbone_sise: base\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: model\.backbone_sise: unknown key; did you mean 'model\.backbone_size'"):
        load_config(str(path))
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))


def test_defaults_and_round_trip(tmp_path):
    cfg = load_config({"model": {"num_classes": 4, "backbone_kwargs": {"depth": 4}}})
    assert isinstance(cfg, Config) and cfg.model.decoder.norm == "layernorm" and cfg.train.num_epochs == 1000
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(str(tmp_path / "c.yaml")) == cfg


def test_train_distributed_defaults_to_ddp():
    assert load_config({}).train.distributed == "ddp"
    assert load_config({"train": {"distributed": "fsdp"}}).train.distributed == "fsdp"


def test_from_config_needs_num_classes():
    with pytest.raises(ValueError, match="model.num_classes"):
        UperNetViT.from_config({"model": {"backbone_kwargs": dict(TINY)}})


def test_a_speed_flag_is_not_a_model_option(tmp_path):
    """Winograd is a fast path (``optimize``), not part of the architecture: a config.yaml naming it is an
    unknown key, as any other (the pre-release ``decoder.winograd`` key is not carried)."""
    from helpers import tiny_model

    tiny_model().save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.yaml"
    path.write_text(path.read_text().replace("    aux_channels: 256\n", "    aux_channels: 256\n    winograd: true\n"))
    with pytest.raises(ConfigError, match=r"model\.decoder\.winograd: unknown key"):
        UperNetViT.from_pretrained(tmp_path / "m", verify=False)  # verified, the digest would name the edit first
