"""NIfTI volumes (issue 27): an nnU-Net raw .nii.gz dataset trains slice by slice (folds of whole volumes,
z-scored per volume, 2.5-D context slices), predict writes masks with the inputs' geometry, evaluate scores
each volume in 3-D; damaged or mismatched volumes are one-line errors naming the file."""
import gzip
import json
import os
import sys

import numpy as np
import pytest

nib = pytest.importorskip("nibabel", reason='needs the medical extra: pip install -e ".[medical]"')

from upernet_vit.cli import main  # noqa: E402
from upernet_vit.config import load_config  # noqa: E402
from upernet_vit.data.datasets import load_nnunet_raw  # noqa: E402
from upernet_vit.data.volumes import VolumeSlice, channel_normalization, volume_slices  # noqa: E402
from upernet_vit.data.prepare import prepare_data  # noqa: E402
from upernet_vit.data.volume_io import read_volume, slice_axis, write_label_volume  # noqa: E402
from upernet_vit.runs.record import read_record  # noqa: E402
from helpers import tiny_train_config  # noqa: E402

SHAPE = (24, 20, 6)  # [X, Y, Z]; Z has the largest spacing: 6 in-plane slices of 24 x 20


def _affine():
    """Anisotropic (0.8, 0.9, 3 mm), x flipped and turned 20 degrees about z: an oblique, mirrored geometry."""
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    rotation = np.array([[-c, -s, 0], [s, -c, 0], [0, 0, 1]])  # a flip and a turn
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 0.9, 3.0])
    affine[:3, 3] = [12.5, -40.0, 7.0]
    return affine


def _save(path, array, affine=None, dtype=np.int16):
    image = nib.Nifti1Image(array.astype(dtype), _affine() if affine is None else affine)
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=2)
    nib.save(image, str(path))


def _volume(seed):
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    cx, cy = rng.integers(8, 16), rng.integers(7, 13)
    label = (((x - cx) ** 2 + (y - cy) ** 2 < 20) & (z >= 2) & (z <= 4)).astype(np.uint8)
    image = -500 + 60 * rng.normal(size=SHAPE) + 400.0 * label  # CT-like values, negative
    return image, label


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw") / "Dataset003_Liver"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True)
    for i in range(6):
        image, label = _volume(i)
        _save(root / "imagesTr" / f"liver_{i:03d}_0000.nii.gz", image)
        _save(root / "labelsTr" / f"liver_{i:03d}.nii.gz", label, dtype=np.uint8)
    for i in range(2):
        _save(root / "imagesTs" / f"test_{i:03d}_0000.nii.gz", _volume(10 + i)[0])
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1},
                                                   "numTraining": 6, "file_ending": ".nii.gz"}))
    return root


def test_slices_are_taken_in_plane_and_geometry_survives_the_round_trip(tmp_path, dataset):
    assert slice_axis((0.8, 0.9, 3.0)) == 2 and slice_axis((3.0, 0.8, 0.8)) == 0 and slice_axis((1, 1, 1)) == 2
    assert slice_axis((0.8, 0.9, 3.0), configured=0) == 0
    source = str(dataset / "labelsTr" / "liver_000.nii.gz")
    array, _ = read_volume(source)
    labels = np.moveaxis(array, 2, 0).astype(np.int64)  # [S, H, W]
    write_label_volume(str(tmp_path / "out.nii.gz"), labels, 2, source)
    a, b = nib.load(source), nib.load(str(tmp_path / "out.nii.gz"))
    assert b.shape == a.shape and np.allclose(b.affine, a.affine) and b.header.get_zooms() == a.header.get_zooms()
    assert np.allclose(b.get_qform(), a.get_qform()) and np.allclose(b.get_sform(), a.get_sform())
    assert int(b.header["sform_code"]) == 2 and b.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(b.dataobj), np.asarray(a.dataobj))


def test_volumes_load_as_slices_with_context_in_order(dataset):
    info, cases = load_nnunet_raw(str(dataset))
    assert info.num_channels == 1 and cases[0].image.shape == (6, 1, 24, 20) and cases[0].label.shape == (6, 24, 20)
    volume = cases[0].image
    slices = volume_slices(cases[0], 1, info.num_classes)
    assert [s.case_id for s in slices[:2]] == ["liver_000/0000", "liver_000/0001"]
    mean, std = volume.mean(), volume.std()
    z = (volume[:, 0] - mean) / std
    first, third = slices[0].pixels(), slices[2].pixels()
    assert first.shape == (3, 24, 20)  # slices -1 (the first, repeated), 0, 1
    assert np.allclose(first, np.stack([z[0], z[0], z[1]]), atol=1e-4)
    assert np.allclose(third, z[1:4], atol=1e-4)
    assert np.allclose(slices[-1].pixels(), np.stack([z[4], z[5], z[5]]), atol=1e-4)
    assert slices[0].present_classes() == [0] and slices[3].present_classes() == [0, 1]


def test_a_ct_channel_is_clipped_and_z_scored_with_the_training_sets_foreground(dataset):
    import dataclasses

    info, cases = load_nnunet_raw(str(dataset))
    assert info.channel_names == ["CT"]
    training = cases[:4]
    foreground = np.concatenate([c.image[:, 0][c.label > 0] for c in training])  # fewer than 10,000: all of them
    (rule,) = channel_normalization(info, training)
    low, high = np.percentile(foreground, [0.5, 99.5])
    assert rule["scheme"] == "ct" and np.allclose(rule["clip"], [low, high], rtol=1e-5)
    assert np.isclose(rule["mean"], foreground.mean(), rtol=1e-5) and np.isclose(rule["std"], foreground.std(), rtol=1e-4)
    expected = (np.clip(cases[5].image[3], low, high) - foreground.mean()) / foreground.std()
    assert np.allclose(volume_slices(cases[5], 0, 2, [rule])[3].pixels(), expected, atol=1e-4)  # any volume, one rule
    assert channel_normalization(dataclasses.replace(info, channel_names=["T2"]), training) == [{"scheme": "zscore"}]


def test_folds_keep_each_volume_whole_and_the_cache_matches_memory(tmp_path, dataset):
    cfg = load_config({"data": {"format": "nnunet", "root": str(dataset), "context_slices": 2, "fold": 1}}).data
    cached, plain = prepare_data(cfg, str(tmp_path / "cache")), prepare_data(cfg)
    train = {c.case_id.split("/")[0] for c in cached.train_cases}
    val = {c.case_id.split("/")[0] for c in cached.val_cases}
    assert train and val and not train & val and len(train | val) == 6
    assert cached.info.num_channels == 5 and cached.normalization == "volume" and cached.volumes
    assert cached.val_cases[0].volume.dtype == np.int16  # Hounsfield-like integers: 2 bytes a voxel, mapped
    assert len(cached.train_cases) == 6 * len(train)
    for a, b in zip(cached.val_cases, plain.val_cases):
        assert isinstance(a, VolumeSlice) and np.allclose(a.pixels(), b.pixels(), atol=1e-5)
        assert np.array_equal(a.classes(), b.classes()) and a.present_classes() == b.present_classes()
    assert load_config({"data": {"format": "nnunet", "root": str(dataset)}}).data.context_slices == 0
    with pytest.raises(ValueError, match=r"data.context_slices 1 takes neighbouring slices of volumes"):
        prepare_data(load_config({"data": {"context_slices": 1}}).data)


@pytest.mark.slow
def test_train_predict_evaluate_a_nifti_dataset_end_to_end(tmp_path, dataset, capsys):
    config = tiny_train_config(data={"format": "nnunet", "root": str(dataset), "patch_size": [16, 16],
                                     "context_slices": 1, "batch_size": 4},
                               train={"num_epochs": 2}, model={"decoder": {"aux_head": False}})
    from upernet_vit.training.trainer import Trainer

    history = Trainer(config, str(tmp_path / "run")).run()
    assert len(history) == 2 and np.isfinite(history[-1]["train_loss"])
    record = read_record(str(tmp_path / "run" / "checkpoint_latest"))
    assert (record.normalization, record.context_slices, record.slice_axis, record.num_channels) == ("volume", 1, None, 3)
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(tmp_path / "run"), "--input", str(dataset / "imagesTs"),
                 "--output", str(out), "--device", "cpu"]) == 0
    for i in range(2):
        source = nib.load(str(dataset / "imagesTs" / f"test_{i:03d}_0000.nii.gz"))
        mask = nib.load(str(out / f"test_{i:03d}.nii.gz"))
        assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)
        assert mask.header.get_zooms() == source.header.get_zooms() and set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    assert main(["predict", "--model", str(tmp_path / "run"), "--input", str(dataset / "labelsTr"),
                 "--output", str(tmp_path / "gt_pred"), "--device", "cpu"]) == 0  # label volumes as inputs work too
    assert main(["evaluate", "--pred", str(tmp_path / "gt_pred"), "--gt", str(dataset / "labelsTr"),
                 "--labels", str(dataset / "dataset.json"), "--output", str(tmp_path / "summary.json")]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["per_case"]) == 6


@pytest.mark.parametrize("damage, message", [
    ("4d", r"has shape \(24, 20, 6, 2\), not 3-D: give one 3-D file per channel"),
    ("shape", r"has shape \(24, 20, 5\) but its image .* has \(24, 20, 6\)"),
    ("affine", r"has another affine \(voxel-to-world geometry\) than its image"),
    ("nan", r"has 3 non-finite voxel value\(s\)"),
    ("truncated", r"cannot read volume .*liver_002_0000.nii.gz' \(damaged or truncated\?\)"),
    ("fraction", r"label volume .*liver_002.nii.gz' holds non-integer values"),
])
def test_a_bad_volume_is_one_line_naming_the_file(tmp_path, dataset, damage, message):
    import shutil

    root = tmp_path / "Dataset009_Bad"
    shutil.copytree(dataset, root)
    image, label = _volume(2)
    bad_image = root / "imagesTr" / "liver_002_0000.nii.gz"
    bad_label = root / "labelsTr" / "liver_002.nii.gz"
    if damage == "4d":
        _save(bad_image, np.stack([image, image], -1))
    elif damage == "shape":
        _save(bad_label, label[..., :5], dtype=np.uint8)
    elif damage == "affine":
        _save(bad_label, label, affine=np.diag([1.0, 1.0, 1.0, 1.0]), dtype=np.uint8)
    elif damage == "fraction":
        _save(bad_label, label.astype(np.float32) + 0.5, dtype=np.float32)
    elif damage == "nan":
        image = image.astype(np.float32)
        image[0, 0, :3] = np.nan
        _save(bad_image, image, dtype=np.float32)
    else:
        data = bad_image.read_bytes()
        bad_image.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=message):
        load_nnunet_raw(str(root))


def test_volumes_of_another_in_plane_spacing_are_named_with_figures(tmp_path, dataset, caplog):
    import logging
    import shutil

    root = tmp_path / "Dataset010_Mixed"
    shutil.copytree(dataset, root)
    coarse = np.diag([1.2, 1.2, 3.0, 1.0])  # 1.2 mm in-plane against 0.8 x 0.9 elsewhere
    image, label = _volume(1)
    _save(root / "imagesTr" / "liver_001_0000.nii.gz", image, affine=coarse)
    _save(root / "labelsTr" / "liver_001.nii.gz", label, affine=coarse, dtype=np.uint8)
    with caplog.at_level(logging.WARNING, logger="upernet_vit.data.volumes"):
        prepare_data(load_config({"data": {"format": "nnunet", "root": str(root)}}).data)
    assert "1 of 6 volumes have an in-plane spacing more than 10% from the median [0.8, 0.9] mm" in caplog.text
    assert "liver_001 [1.2, 1.2]" in caplog.text


def test_a_folder_of_volumes_trains_like_the_nnunet_layout(tmp_path, dataset):
    import shutil

    root = tmp_path / "ct_folders"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(3):
        shutil.copy(dataset / "imagesTr" / f"liver_{i:03d}_0000.nii.gz", root / "images" / f"ct{i}.nii.gz")
        shutil.copy(dataset / "labelsTr" / f"liver_{i:03d}.nii.gz", root / "masks" / f"ct{i}.nii.gz")
    data = prepare_data(load_config({"data": {"format": "folders", "root": str(root), "fold": "all"}}).data,
                        str(tmp_path / "cache"))
    assert data.volumes and data.info.label_values == [0, 1] and data.info.file_ending == ".nii.gz"
    assert [c.case_id for c in data.train_cases[:2]] == ["ct0/0000", "ct0/0001"] and len(data.train_cases) == 18
    _, nnunet = load_nnunet_raw(str(dataset))
    assert np.array_equal(data.train_cases[3].classes(), nnunet[0].label[3])
    from PIL import Image

    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "images" / "flat.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "masks" / "flat.png")
    with pytest.raises(ValueError, match=r"holds NIfTI volumes and 2-D image files in images/ or masks/"):
        prepare_data(load_config({"data": {"format": "folders", "root": str(root)}}).data)


def test_without_nibabel_a_volume_dataset_names_the_extra(dataset, monkeypatch):
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(ModuleNotFoundError, match=r'pip install -e "\.\[medical\]" in the checkout'):
        load_nnunet_raw(str(dataset))
