"""z-stacks of 2-D pages (issue 27): with ``data.stacks`` a multi-page TIFF (electron-microscopy sections)
trains as a volume of its pages, 2.5-D with context slices, and predict writes a stack of as many pages;
without it a multi-page training file stays refused (issue 25)."""
import numpy as np
import pytest
from PIL import Image

from upernet_vit.cli import main
from upernet_vit.config import load_config
from upernet_vit.data.prepare import prepare_data
from upernet_vit.data.image_io import read_label_pages
from upernet_vit.training.trainer import Trainer
from helpers import tiny_train_config


def _stack(path, pages):
    images = [Image.fromarray(p) for p in pages]
    images[0].save(path, save_all=True, append_images=images[1:])


def _dataset(root, count=3, pages=5, size=(24, 20)):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        masks = [np.zeros(size, np.uint8) for _ in range(pages)]
        for p, m in enumerate(masks):
            m[4 + p: 12 + p, 5:14] = 1  # a membrane-like blob drifting through the sections
        images = [(rng.normal(100, 20, size) + 80 * m).clip(0, 255).astype(np.uint8) for m in masks]
        _stack(root / "images" / f"em{i}.tif", images)
        _stack(root / "masks" / f"em{i}.tif", masks)
    return root


def test_a_declared_stack_trains_as_a_volume_of_its_pages(tmp_path):
    root = _dataset(tmp_path / "em")
    data = prepare_data(load_config({"data": {"format": "folders", "root": str(root), "stacks": True,
                                              "context_slices": 1, "fold": "all"}}).data, str(tmp_path / "cache"))
    assert data.volumes and data.info.num_channels == 3 and len(data.train_cases) == 15
    first = data.train_cases[0]
    assert first.case_id == "em0/0000" and first.pixels().shape == (3, 24, 20)
    assert np.array_equal(data.train_cases[2].classes(), read_label_pages(str(root / "masks" / "em0.tif"))[2])
    with pytest.raises(ValueError, match=r"has 5 pages"):  # not declared: refused as before, naming the pages
        prepare_data(load_config({"data": {"format": "folders", "root": str(root)}}).data)


def test_a_stack_model_predicts_a_stack_page_by_page_with_its_context(tmp_path):
    root = _dataset(tmp_path / "em", count=4)
    config = tiny_train_config(data={"format": "folders", "root": str(root), "stacks": True, "context_slices": 1,
                                     "patch_size": [16, 16], "num_folds": 2}, train={"num_epochs": 1},
                               model={"decoder": {"aux_head": False}})
    Trainer(config, str(tmp_path / "run")).run()
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(tmp_path / "run"), "--input", str(root / "images"),
                 "--output", str(out), "--device", "cpu"]) == 0
    masks = read_label_pages(str(out / "em1.tif"))
    assert masks.shape == (5, 24, 20) and set(np.unique(masks)) <= {0, 1}
