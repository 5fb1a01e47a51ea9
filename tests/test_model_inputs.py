"""No silent wrong results from what goes in (issue 11): non-finite or integer images, config values that
are not finite, out of range or given twice, and label values or data folders that do not add up."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from upernet_vit.config import ConfigError, TrainConfig, load_config
from upernet_vit.data.datasets import load_folders
from upernet_vit.data.image_io import read_image
from upernet_vit.training.trainer import Trainer
from helpers import float_tiff as _float_tiff, gray as _gray, tiny_model, tiny_train_config

pytestmark = pytest.mark.reliability  # what a user's bad input, damaged file or crash leads to


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


def test_yaml_merge_keys_may_override_and_non_utf8_files_are_named(tmp_path):
    from upernet_vit.config import read_yaml

    path = tmp_path / "m.yaml"
    path.write_text("base: &b\n  num_epochs: 3\n  seed: 1\ntrain:\n  <<: *b\n  num_epochs: 4\n")
    assert read_yaml(str(path))["train"] == {"num_epochs": 4, "seed": 1}  # an override, not a duplicate
    path.write_bytes(b"train:\n  seed: \xff\n")
    with pytest.raises(ConfigError, match=r"m.yaml: not a UTF-8 text file"):
        read_yaml(str(path))


# ---------------------------------------------------------------------------- labels and data folders
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
    from upernet_vit.data.datasets import load_nnunet_raw
    from upernet_vit.data.demo import write_demo_dataset

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
