"""nnU-Net v2: plan and preprocess a tiny dataset, train the UperNetViT trainer on CPU, predict with the
stock nnUNetv2_predict. Needs the nnunet extra (CI runs it in its nnU-Net venv)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

nnunetv2 = pytest.importorskip("nnunetv2", reason='needs the nnunet extra: pip install -e ".[nnunet]"')

from upernet_vit.cli import main  # noqa: E402
from upernet_vit.config import load_config  # noqa: E402
from upernet_vit.integrations.nnunet import EXT_TRAINER_DIR  # noqa: E402
from upernet_vit.integrations.nnunet import trainer as trainers  # noqa: E402
from upernet_vit.data.demo import write_demo_dataset  # noqa: E402
from upernet_vit.data.image_io import read_label  # noqa: E402

pytestmark = pytest.mark.nnunet

TINY = dict(depth=4, embed_dim=32, num_heads=2)


def _bin(name):
    return os.path.join(os.path.dirname(sys.executable), name)


@pytest.fixture(scope="module")
def nnunet_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet")
    env = dict(os.environ, nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
               nnUNet_results=str(root / "results"), nnUNet_n_proc_DA="1", OMP_NUM_THREADS="2")
    write_demo_dataset(str(root / "raw" / "Dataset001_Demo"), num_train=12, num_test=2, size=64)
    result = subprocess.run(
        [_bin("nnUNetv2_plan_and_preprocess"), "-d", "1", "-c", "2d", "-np", "1", "--verify_dataset_integrity"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    return root, env


def test_ext_trainer_folder_is_what_nnunet_imports():
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    found = recursive_find_python_class(EXT_TRAINER_DIR, "nnUNetTrainerUperNetViT_DINOv2_Base", None,
                                        base_folder=EXT_TRAINER_DIR, cleanup_imports_from_base_folder=True)
    assert found is trainers.nnUNetTrainerUperNetViT_DINOv2_Base


@pytest.mark.parametrize("name", [n for n in trainers.__all__ if n != "nnUNetTrainerUperNetViT"])
def test_recipe_trainers_have_valid_configs(name):
    config = getattr(trainers, name).recipe()
    assert config.model.backbone in ("dinov2", "dinov3", "retfound", "visionfm")
    assert config.train.optimizer == "adamw" and config.train.warmup_epochs > 0
    if config.model.backbone_size == "7b":  # the large-model path: bf16 storage, LoRA, checkpointing
        assert config.model.backbone_dtype == "bfloat16" and config.lora.enabled and config.model.gradient_checkpointing
        assert config.model.decoder.pyramid == "vitdet"


@pytest.mark.parametrize("name", [n for n in trainers.__all__ if n != "nnUNetTrainerUperNetViT"])
def test_each_recipe_trainer_trains_its_shipped_yaml(name, monkeypatch):
    """One source per recipe (issue 26): the trainer's config is its YAML's, as ``upernet-vit train`` reads it."""
    from upernet_vit.recipes import recipe_path

    monkeypatch.delenv(trainers.CHECKPOINT_ENV, raising=False)
    trainer = getattr(trainers, name)
    assert trainer.recipe() == load_config(recipe_path(trainer.recipe_name))
    monkeypatch.setenv(trainers.CHECKPOINT_ENV, "/weights/file.pth")  # the one thing the environment changes
    assert trainer.recipe().model.checkpoint_path == "/weights/file.pth"


def test_a_recipe_with_a_bfloat16_backbone_and_no_weights_is_refused_before_it_is_built():
    """Issue 25, bad case 7: the 7B recipe without its weights file was built in float32 (27 GB) and killed."""
    config = trainers.nnUNetTrainerUperNetViT_DINOv3_7B_LoRA.recipe()
    assert not config.model.checkpoint_path
    with pytest.raises(ValueError, match=r"keeps the backbone frozen, but it has no weights"):
        trainers.build_network(config, ["zscore"], 1, 2, load_pretrained=True)


def test_class_weights_are_refused_not_dropped_inside_nnunet(tmp_path, monkeypatch):
    from upernet_vit.integrations.nnunet import CONFIG_ENV

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"class_weights": "auto"}}))
    monkeypatch.setenv(CONFIG_ENV, str(path))
    with pytest.raises(ValueError, match="train.class_weights applies to `upernet-vit train`"):
        trainers.nnUNetTrainerUperNetViT.recipe()


def test_pretrained_backbone_only_when_training(tmp_path):
    import timm

    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **TINY)
    torch.save(vit.state_dict(), tmp_path / "backbone.pth")
    config = load_config({"model": {"backbone": "vit_small_patch16_224", "backbone_size": None, "backbone_kwargs": TINY,
                                    "checkpoint_path": str(tmp_path / "backbone.pth"), "decoder": {"hidden_size": 8}}})
    trained = trainers.build_network(config, ["ZScoreNormalization"], 1, 3, load_pretrained=True)
    assert torch.equal(trained.model.backbone.vit.patch_embed.proj.weight, vit.patch_embed.proj.weight.sum(1, keepdim=True))
    (tmp_path / "backbone.pth").unlink()
    rebuilt = trainers.build_network(config, ["ZScoreNormalization"], 1, 3, load_pretrained=False)
    assert isinstance(rebuilt.standardize, torch.nn.Identity)
    rgb = trainers.build_network(config, ["RGBTo01Normalization"] * 3, 3, 3, load_pretrained=False)
    assert torch.allclose(rgb.standardize.mean.flatten(), torch.tensor(rgb.model.mean))


def test_train_then_stock_predict(nnunet_env, tmp_path):
    root, env = nnunet_env
    import timm

    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **TINY)
    checkpoint = tmp_path / "backbone.pth"
    torch.save(vit.state_dict(), checkpoint)
    config = {
        "model": {"backbone": "vit_small_patch16_224", "backbone_size": None, "backbone_kwargs": TINY,
                  "checkpoint_path": str(checkpoint), "decoder": {"hidden_size": 16}},
        "lora": {"enabled": True, "r": 2, "lora_dropout": 0.0},
        "train": {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1,
                  "warmup_epochs": 0, "initial_lr": 1e-3},
    }
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "upernet_vit", "nnunet-train", "1", "2d", "0", "--config", str(config_path), "-device", "cpu"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    out_dir = root / "results" / "Dataset001_Demo" / "nnUNetTrainerUperNetViT__nnUNetPlans__2d"
    assert (out_dir / "fold_0" / "checkpoint_final.pth").is_file()
    plans = yaml.safe_load((out_dir / "plans.json").read_text())  # JSON is YAML
    stored = plans["configurations"]["2d"]["architecture"]
    assert stored["network_class_name"] == "upernet_vit.UperNetViT"
    assert stored["arch_kwargs"]["upernet_vit"]["lora"]["enabled"] is True

    checkpoint.unlink()  # predictions must not need the pretrained file, nor the config variable
    env_predict = {k: v for k, v in env.items() if k != "UPERNET_VIT_CONFIG"}
    env_predict["nnUNet_extTrainer"] = EXT_TRAINER_DIR
    prediction = tmp_path / "pred"
    result = subprocess.run(
        [_bin("nnUNetv2_predict"), "-i", str(root / "raw" / "Dataset001_Demo" / "imagesTs"), "-o", str(prediction),
         "-d", "1", "-c", "2d", "-tr", "nnUNetTrainerUperNetViT", "-f", "0", "-chk", "checkpoint_final.pth",
         "-device", "cpu", "-npp", "1", "-nps", "1"],
        env=env_predict, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    masks = sorted(p for p in os.listdir(prediction) if p.endswith(".png"))
    assert masks == ["demo_012.png", "demo_013.png"]
    for name in masks:
        mask = read_label(str(prediction / name))
        assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 1, 2, 3}


def test_a_3d_configuration_is_refused_with_the_2d_one_named(nnunet_env, tmp_path, monkeypatch):
    """UperNetViT is a 2-D model: a trainer built for a configuration with a 3-D patch stops at once."""
    import json

    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as base

    root, _ = nnunet_env
    folders = {"nnUNet_raw": root / "raw", "nnUNet_preprocessed": root / "preprocessed",
               "nnUNet_results": tmp_path / "results"}  # its own results: the trainer makes its output folder
    for name, folder in folders.items():
        monkeypatch.setenv(name, str(folder))  # nnunetv2 2.8.1 reads them when used
        if not hasattr(getattr(base, name, None), "is_set"):  # versions that read them at import
            monkeypatch.setattr(base, name, str(folder), raising=False)
    preprocessed = root / "preprocessed" / "Dataset001_Demo"
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    dataset = json.loads((preprocessed / "dataset.json").read_text())
    patch = plans["configurations"]["2d"]["patch_size"]
    plans["configurations"]["3d_fullres"] = {"inherits_from": "2d", "patch_size": [4, *patch],
                                             "spacing": [1.0, 1.0, 1.0]}
    with pytest.raises(RuntimeError, match=r"UperNetViT is a 2D model; configuration '3d_fullres' has patch size "
                                           r"\[4, .*\]\. Train the '2d' configuration\."):
        trainers.nnUNetTrainerUperNetViT({**plans, "continue_training": False}, "3d_fullres", 0, dataset,
                                         device=torch.device("cpu"))
    # the same plans build the 2d trainer (the refusal is the patch's dimension, not the plans)
    from upernet_vit.integrations.nnunet import CONFIG_ENV

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": {"backbone": "vit_small_patch16_224", "backbone_size": None,
                                                "backbone_kwargs": TINY}}))
    monkeypatch.setenv(CONFIG_ENV, str(config))
    built = trainers.nnUNetTrainerUperNetViT({**plans, "continue_training": False}, "2d", 0, dataset,
                                             device=torch.device("cpu"))
    assert len(built.configuration_manager.patch_size) == 2


def test_nnunet_path_command(capsys):
    assert main(["nnunet-path"]) == 0
    assert capsys.readouterr().out.strip() == EXT_TRAINER_DIR


def test_evaluate_writes_the_summary_nnunets_own_evaluation_writes(tmp_path):
    """Our ``metric_per_case``/``mean``/``foreground_mean`` equal nnU-Net's ``compute_metrics_on_folder`` on
    the same files (an ignore label, a class absent from one case), and nnU-Net's loader reads our file."""
    from PIL import Image
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder, load_summary_json
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    from upernet_vit.inference.evaluate import evaluate, write_summary

    rng = np.random.default_rng(0)
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    for case in range(3):
        gt = rng.integers(0, 3, (16, 20)).astype(np.uint8)
        pred = np.where(rng.random((16, 20)) < 0.7, gt, rng.integers(0, 3, (16, 20))).astype(np.uint8)
        gt[:2] = 4  # the ignore label
        if case == 1:
            gt[gt == 2], pred[pred == 2] = 0, 0  # label 2 in neither file: NaN Dice
        Image.fromarray(gt).save(tmp_path / "gt" / f"c{case}.png")
        Image.fromarray(pred).save(tmp_path / "pred" / f"c{case}.png")
    theirs = compute_metrics_on_folder(str(tmp_path / "gt"), str(tmp_path / "pred"), str(tmp_path / "nnunet.json"),
                                       NaturalImage2DIO(), ".png", [1, 2], ignore_label=4, num_processes=1)
    ours = evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), {"background": 0, "a": 1, "b": 2}, ignore_value=4)
    write_summary(ours, str(tmp_path / "ours.json"))
    loaded = load_summary_json(str(tmp_path / "ours.json"))
    for label in (1, 2):
        for metric, value in theirs["mean"][label].items():
            np.testing.assert_allclose(loaded["mean"][label][metric], value, err_msg=f"{label} {metric}")
        for case_theirs, case_ours in zip(theirs["metric_per_case"], loaded["metric_per_case"]):
            assert os.path.basename(case_ours["reference_file"]) == os.path.basename(case_theirs["reference_file"])
            for metric, value in case_theirs["metrics"][label].items():
                np.testing.assert_allclose(case_ours["metrics"][label][metric], value, err_msg=f"{label} {metric}")
    for metric, value in theirs["foreground_mean"].items():
        np.testing.assert_allclose(loaded["foreground_mean"][metric], value, err_msg=metric)
    assert np.isnan(loaded["metric_per_case"][1]["metrics"][2]["Dice"])
