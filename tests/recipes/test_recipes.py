"""Recipes (issue 26): one YAML file per recipe, shipped inside the package, read by ``upernet-vit train
NAME``, by ``load_config``/``from_config`` and by the nnU-Net recipe trainers (tests/integrations/test_nnunet.py)."""
import configparser
import fnmatch
import os

import pytest

from upernet_vit.cli import main
from upernet_vit.config import load_config
from upernet_vit.recipes import recipe_names, recipe_path, resolve_config
from helpers import REPO_ROOT

ROOT = REPO_ROOT
EXPECTED = {"demo", "upernet", "dinov2_base", "dinov3_large", "dinov3_large_lora", "dinov3_7b_lora", "retfound",
            "visionfm"}


def test_the_recipes_are_package_data():
    assert set(recipe_names()) == EXPECTED
    parser = configparser.ConfigParser()
    parser.read(os.path.join(ROOT, "setup.cfg"))
    patterns = parser["options.package_data"]["upernet_vit.recipes"].split()
    assert all(any(fnmatch.fnmatch(f"{n}.yaml", p) for p in patterns) for n in recipe_names())  # in the wheel
    # a checkout's configs/ is the same files, not a copy that could drift
    assert os.path.realpath(os.path.join(ROOT, "configs")) == os.path.realpath(os.path.dirname(recipe_path("demo")))


def test_a_name_finds_its_recipe_and_a_file_wins_over_a_name(tmp_path, monkeypatch):
    assert load_config("dinov2_base") == load_config(recipe_path("dinov2_base"))
    assert resolve_config(recipe_path("demo")) == recipe_path("demo")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_text("train: {num_epochs: 3}\n")  # the user's own file named like a recipe
    assert resolve_config("demo") == "demo" and load_config("demo").train.num_epochs == 3
    with pytest.raises(FileNotFoundError, match=r"no recipe named 'dinov9'; the recipes are: demo, dinov2_base"):
        resolve_config("dinov9")
    with pytest.raises(FileNotFoundError, match=r"config file 'cfg/x.yaml' does not exist \(a recipe is named "
                                                r"without folder or suffix, e.g. 'demo'"):
        load_config("cfg/x.yaml")


def test_train_takes_a_recipe_name_and_names_the_recipes_when_it_is_wrong(tmp_path, capsys):
    assert main(["train", "dinov9", "--output", str(tmp_path / "run")]) == 2
    assert "no recipe named 'dinov9'; the recipes are: demo, dinov2_base" in capsys.readouterr().err
    assert main(["train", "--output", str(tmp_path / "run")]) == 2
    assert "give a recipe name (demo, dinov2_base" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_dataset_recipe_without_a_dataset_is_refused(tmp_path, capsys):
    # the demo is the only recipe with its own data; the others must not train a 300M ViT on it by default
    assert main(["train", "retfound", "--output", str(tmp_path / "run")]) == 2
    assert "data.root" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(EXPECTED - {"demo", "upernet"}))
def test_foundation_model_recipes_fine_tune_as_their_comments_say(name):
    config = load_config(name)
    train = config.train
    assert (train.optimizer, train.weight_decay, train.warmup_epochs, train.layer_decay) == ("adamw", 0.05, 10, 0.9)
    assert train.initial_lr == (5e-4 if config.lora.enabled else 1e-4)  # LoRA adapters start from zero: 5x
    assert config.lora.enabled == name.endswith("_lora")  # RETFound and VisionFM: full fine-tuning
    assert config.data.format == "nnunet" and config.data.root is None
