"""The data cache (issue 27): a dataset converted once into memory-mapped arrays in its stored dtype, reused
while the sources are unchanged, rebuilt when they change, never inside the dataset, and sampled exactly as
the in-memory dataset is."""
import logging
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from upernet_vit.config import load_config
from upernet_vit.data import cache as data_cache
from upernet_vit.data import datasets
from upernet_vit.data.augment import PatchDataset
from upernet_vit.data.cache import INDEX_NAME, cached_dataset
from upernet_vit.data.datasets import load_folders, load_nnunet_raw
from upernet_vit.data.demo import write_demo_dataset
from upernet_vit.data.normalization import Normalizer
from upernet_vit.data.prepare import prepare_data
from upernet_vit.training.trainer import Trainer
from helpers import tiny_train_config


def _folders(root, n=4, size=(20, 24)):
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        os.makedirs(root / sub, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / "images" / f"c{i}.png")
        mask = np.zeros(size, np.uint8)
        mask[: size[0] // 2] = 1 + i % 2
        Image.fromarray(mask).save(root / "masks" / f"c{i}.png")
    return root


def _data(root, **extra):
    return load_config({"data": {"format": "folders", "root": str(root), **extra}}).data


def test_the_cache_holds_the_stored_dtype_and_gives_the_loaders_values(tmp_path):
    root = _folders(tmp_path / "ds")
    info, cases = cached_dataset(_data(root), str(tmp_path / "cache"))
    plain_info, plain = load_folders(str(root))
    assert info == plain_info
    for cached, case in zip(cases, plain):
        assert isinstance(cached.image, np.memmap) and cached.image.dtype == np.uint8  # 1 byte a value, mapped
        assert cached.label.dtype == np.int16 and not cached.image.flags.writeable
        assert np.array_equal(cached.pixels(), case.image) and cached.pixels().dtype == np.float32
        assert np.array_equal(cached.classes(), case.label)
        assert cached.pixel_range() == case.pixel_range() and cached.present_classes() == case.present_classes()
        assert (cached.case_id, cached.source, cached.full_scale) == (case.case_id, case.source, case.full_scale)
    (folder,) = os.listdir(tmp_path / "cache")
    assert folder.startswith("ds-") and INDEX_NAME in os.listdir(tmp_path / "cache" / folder)


def test_an_nnunet_dataset_of_16_bit_and_float_images_keeps_its_values(tmp_path):
    root = write_demo_dataset(str(tmp_path / "Dataset001_Demo"), num_train=3, num_test=0, size=16)
    info, cases = cached_dataset(load_config({"data": {"format": "nnunet", "root": root}}).data, str(tmp_path / "c"))
    _, plain = load_nnunet_raw(root)
    assert info.label_names == ["background", "disk", "square", "triangle"]
    assert all(np.array_equal(a.pixels(), b.image) and np.array_equal(a.classes(), b.label) for a, b in zip(cases, plain))
    assert data_cache._stored_dtype(np.array([[[0.0, 65535.0]]], np.float32)) == np.uint16
    assert data_cache._stored_dtype(np.array([[[0.5, 1.0]]], np.float32)) == np.float32  # fractions stay exact
    assert data_cache._stored_dtype(np.array([[[-1024.0, 3071.0]]], np.float32)) == np.int16  # CT, 2 bytes
    assert data_cache._stored_dtype(np.array([[[-3.0, 70000.0]]], np.float32)) == np.float32


def test_a_second_run_reads_no_image_and_a_changed_file_rebuilds(tmp_path, monkeypatch, caplog):
    root = _folders(tmp_path / "ds")
    cfg, where = _data(root), str(tmp_path / "cache")
    first = cached_dataset(cfg, where)[1]
    monkeypatch.setattr(datasets, "read_case", lambda *a: pytest.fail("a reused cache reads no image file"))
    with caplog.at_level(logging.INFO, logger="upernet_vit.data.cache"):
        again = cached_dataset(cfg, where)[1]
    assert "4 cases from" in caplog.text
    assert all(np.array_equal(a.pixels(), b.pixels()) for a, b in zip(first, again))
    monkeypatch.undo()
    old = set(os.listdir(where))
    mask = np.full((20, 24), 2, np.uint8)  # an edited mask: new contents and modification time
    time.sleep(0.01)
    Image.fromarray(mask).save(root / "masks" / "c0.png")
    rebuilt = cached_dataset(cfg, where)[1]
    assert np.array_equal(rebuilt[0].classes(), np.full((20, 24), 2))
    assert len(os.listdir(where)) == 1 and set(os.listdir(where)) != old  # the stale cache is gone
    assert cached_dataset(_data(root, labels={"background": 0, "a": 1, "b": 2, "c": 3}), where)[0].label_names[-1] == "c"


def test_a_bad_file_is_named_at_conversion_and_leaves_no_cache(tmp_path):
    root = _folders(tmp_path / "ds")
    Image.fromarray(np.full((20, 24), 7, np.uint8)).save(root / "masks" / "c3.png")  # not a label of the others
    with pytest.raises(ValueError, match=r"c3.png' has values \[7\] that are not among the dataset's labels"):
        cached_dataset(_data(root, labels={"background": 0, "a": 1, "b": 2}), str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache") == []  # no half cache, no temporary folder


def test_patches_from_the_cache_equal_those_from_memory(tmp_path):
    root = _folders(tmp_path / "ds", n=3, size=(40, 48))
    cfg = _data(root)
    for normalization in ("preset", "zscore"):
        normalizer = Normalizer([0.5] * 3, [0.25] * 3, normalization, 255.0)
        sets = [PatchDataset(cases, [32, 32], normalizer, 6, 0, load_config({}).data.augmentation)
                for cases in (cached_dataset(cfg, str(tmp_path / "c"))[1], load_folders(str(root))[1])]
        for i in range(6):
            (a, la), (b, lb) = sets[0][i], sets[1][i]
            assert torch.equal(a, b) and torch.equal(la, lb)


def test_prepare_data_through_the_cache_sees_what_memory_sees(tmp_path):
    root = _folders(tmp_path / "ds", n=6)
    cfg = _data(root)
    cached, plain = prepare_data(cfg, str(tmp_path / "c")), prepare_data(cfg)
    assert (cached.intensity_scale, cached.intensity_range, cached.absent) == (
        plain.intensity_scale, plain.intensity_range, plain.absent)
    assert [c.case_id for c in cached.train_cases] == [c.case_id for c in plain.train_cases]


def test_training_writes_the_cache_beside_the_run_never_in_the_dataset(tmp_path):
    root = _folders(tmp_path / "ds", n=6, size=(32, 32))
    data = {"format": "folders", "root": str(root), "patch_size": [32, 32]}
    trainer = Trainer(tiny_train_config(train={"num_epochs": 1}, data=data), str(tmp_path / "runs" / "a"))
    trainer.release()
    assert os.listdir(tmp_path / "runs" / ".upernet-vit-cache")[0].startswith("ds-")
    assert sorted(os.listdir(root)) == ["images", "masks"]
    with pytest.raises(ValueError, match=r"data.cache_dir .* lies inside the data.root .*: the cache would be written among the dataset"):
        Trainer(tiny_train_config(data={**data, "cache_dir": str(root / "cache")}), str(tmp_path / "runs" / "b"))
    assert sorted(os.listdir(root)) == ["images", "masks"]


@pytest.mark.slow
def test_two_ddp_processes_share_one_cache_built_by_the_first(tmp_path):
    import json
    import subprocess
    import sys

    import yaml

    from helpers import TINY_CONFIG

    root = _folders(tmp_path / "ds", n=6, size=(32, 32))
    cfg = json.loads(json.dumps(TINY_CONFIG))
    cfg["train"]["num_epochs"] = 1
    cfg["data"] = {**cfg["data"], "format": "folders", "root": str(root), "num_workers": 0}
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "upernet_vit", "train", str(path), "--output", str(tmp_path / "runs" / "ddp")],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    caches = os.listdir(tmp_path / "runs" / ".upernet-vit-cache")
    assert len(caches) == 1 and caches[0].startswith("ds-")  # one cache, no temporary folder of another rank
    assert result.stderr.count("data cache: 6 cases written") == 1  # built once, by rank 0
