"""No silent wrong results from the data (issue 16): one intensity rule whatever the file type, labels
that never come from stray or lossy values, and data files whose errors name the file."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from upernet_vit.data.datasets import load_folders, load_nnunet_raw
from upernet_vit.data.splits import fold_case_ids
from upernet_vit.data.demo import demo_cases, write_demo_dataset
from upernet_vit.data.image_io import read_image
from upernet_vit.data.intensity import check_input_range, choose_intensity_scale, full_scale
from upernet_vit.inference.metrics import summarize
from upernet_vit.data.prepare import prepare_data
from upernet_vit.training.trainer import Trainer
from helpers import tiny_train_config

pytestmark = pytest.mark.reliability  # what a user's bad input, damaged file or crash leads to


def _folders(root, images, masks):
    """``root/images`` and ``root/masks`` from ``{name: array}`` (the suffix of ``name`` picks the type)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for name, array in images.items():
        Image.fromarray(array).save(root / "images" / name)
    for name, array in masks.items():
        Image.fromarray(array).save(root / "masks" / name)
    return str(root)


def _mask(i=0, size=32):
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[4 + i : 20 + i, 6:22] = 1
    return mask


# ---------------------------------------------------------------------------- the intensity rule
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A 1-epoch tiny run on the demo data (8-bit values)."""
    out = tmp_path_factory.mktemp("run") / "run"
    Trainer(tiny_train_config(train={"num_epochs": 1}), str(out)).run()
    return str(out / "checkpoint_latest")


def test_the_same_pixels_in_any_file_type_give_the_same_mask(tmp_path, demo_run):
    """Issue 16: a float32 TIFF holding an 8-bit PNG's values predicted another class everywhere."""
    from upernet_vit.inference.predict import predict

    image = np.round(demo_cases(1, 32, seed=5)[0].image[0]).astype(np.uint8)
    folders = {"png8": (image, ".png"), "png16": (image.astype(np.uint16), ".png"),
               "tif_float": (image.astype(np.float32), ".tif"), "tif16": (image.astype(np.uint16), ".tif")}
    masks, probs = {}, {}
    for name, (array, suffix) in folders.items():
        inputs = tmp_path / name
        inputs.mkdir()
        Image.fromarray(array).save(inputs / f"case{suffix}")
        assert np.array_equal(read_image(str(inputs / f"case{suffix}"))[0], image.astype(np.float32))
        predict(demo_run, str(inputs), str(tmp_path / f"out_{name}"), device="cpu", save_probabilities=True)
        masks[name] = np.asarray(Image.open(tmp_path / f"out_{name}" / "case.png"))
        probs[name] = np.load(tmp_path / f"out_{name}" / "case_probs.npz")["probabilities"]
    for name in folders:
        assert np.array_equal(masks[name], masks["png8"]), name
        assert np.array_equal(probs[name], probs["png8"]), name
    with open(f"{demo_run}/preprocessing.json") as f:
        record = json.load(f)
    assert record["intensity_scale"] == 255.0 and record["normalization"] == "preset"
    assert 0 <= record["intensity_range"][0] < record["intensity_range"][1] <= 255


def test_the_demo_data_in_memory_equals_the_written_pngs(tmp_path):
    root = write_demo_dataset(str(tmp_path / "demo"), num_train=3, num_test=0, size=32)
    _, cases = load_nnunet_raw(root)
    for written, memory in zip(cases, demo_cases(3, 32)):
        assert np.array_equal(written.image, memory.image) and written.full_scale == memory.full_scale == 255.0


def test_predict_refuses_values_outside_the_training_range_and_rescaled_copies_unless_accepted(tmp_path, demo_run, caplog):
    """Issue 25: a float TIFF in [0, 1] given to a model trained on 8-bit images was predicted with exit 0 and
    one warning line (probabilities off by 0.61); now it is an error, unless the user accepts it."""
    from upernet_vit.inference.predict import predict

    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16)).save(inputs / "deep.png")
    with pytest.raises(ValueError, match=r"input .*deep.png' \(1 such\) has values 40000..40000, outside the range "
                                         r"0..255 the model was trained on \(intensity_scale 255"):
        predict(demo_run, str(inputs), str(tmp_path / "out"), device="cpu")
    assert not (tmp_path / "out").exists()
    (inputs / "deep.png").unlink()
    Image.fromarray(np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)).save(inputs / "unit.tif")
    with pytest.raises(ValueError, match=r"unit.tif' \(1 such\) has every value in \[0, 1\] but the training images "
                                         r"reached .*confirm with accept_intensity=True$"):
        predict(demo_run, str(inputs), str(tmp_path / "out"), device="cpu")
    assert not (tmp_path / "out").exists()
    with caplog.at_level(logging.WARNING):
        predict(demo_run, str(inputs), str(tmp_path / "out"), device="cpu", accept_intensity=True)
    assert "unit.tif' (1 such) has every value in [0, 1] but the training images reached" in caplog.text
    assert (tmp_path / "out" / "unit.png").is_file()
    check_input_range({"x": (-5.0, 900.0)}, "zscore", 1.0, [0.0, 1.0], "p.json")  # zscore: any range


def test_mixed_bit_depths_are_refused_naming_files_unless_the_rule_handles_them(tmp_path):
    images = {f"a{i}.png": np.full((32, 32), 100 + i, np.uint8) for i in range(3)}
    images.update({f"b{i}.tif": np.full((32, 32), 30000 + i, np.uint16) for i in range(2)})
    masks = {f"{n[:2]}.png": _mask(i) for i, n in enumerate(sorted(images))}
    root = _folders(tmp_path / "mixed", images, masks)
    config = dict(format="folders", root=root, fold="all")
    with pytest.raises(ValueError, match=r"different value ranges: 3 in 8-bit 0..255 \(e.g. .*a0.png'\); 2 in "
                                         r"16-bit 0..65535 \(e.g. .*b0.tif'\)"):
        prepare_data(tiny_train_config(data=config).data)
    assert prepare_data(tiny_train_config(data=dict(config, normalization="zscore")).data).intensity_scale == 1.0
    stated = prepare_data(tiny_train_config(data=dict(config, intensity_scale=65535)).data)
    assert stated.intensity_scale == 65535.0 and stated.intensity_range == [100.0, 30001.0]
    # 16-bit files whose values fit 8 bits are the same range as the 8-bit ones: no conflict
    for i in range(2):
        Image.fromarray(np.full((32, 32), 200, np.uint16)).save(tmp_path / "mixed" / "images" / f"b{i}.tif")
    assert prepare_data(tiny_train_config(data=config).data).intensity_scale == 255.0


def test_full_scales():
    assert full_scale(np.array([0.0, 0.5]), integer=False) == 1.0
    assert full_scale(np.array([0.0, 1.0]), integer=True) == 255.0  # an all-dark 8-bit image is still 8-bit
    assert full_scale(np.array([0.0, 256.0]), integer=True) == 65535.0
    assert full_scale(np.array([-1.0, 3.0]), integer=False) is None
    assert full_scale(np.array([70000.0]), integer=True) is None
    with pytest.raises(ValueError, match=r"training image 'f.tif' \(1 such\) has values below 0 or above 65535"):
        choose_intensity_scale({"f.tif": None, "g.png": 255.0}, "preset", "auto")


# ---------------------------------------------------------------------------- labels
def test_lossy_masks_are_refused_naming_the_file(tmp_path):
    images = {f"c{i}.png": np.full((32, 32), 90, np.uint8) for i in range(2)}
    root = _folders(tmp_path / "jpg", images, {"c0.png": _mask() * 255})
    Image.fromarray(_mask() * 254).save(tmp_path / "jpg" / "masks" / "c1.jpg", quality=75)
    with pytest.raises(ValueError, match=r"label file .*c1.jpg' is a JPEG, a lossy format"):
        load_folders(root)


def test_mask_values_that_do_not_look_like_a_label_map_need_data_labels(tmp_path):
    images = {f"c{i}.png": np.full((32, 32), 90, np.uint8) for i in range(2)}
    three = _mask()
    three[25:, 25:] = 2
    noisy = (_mask() * 254).astype(np.uint8)
    noisy[0, 0], noisy[0, 1] = 127, 3  # what JPEG does to a 0/254 mask
    root = _folders(tmp_path / "noisy", images, {"c0.png": noisy, "c1.png": _mask() * 254})
    with pytest.raises(ValueError, match=r"data.labels is not set and the masks in .* hold 4 values \(0: .*, 3: 1, "
                                         r"127: 1, 254: .* pixels\) that do not look like a label map.*e.g. 3 in .*c0.png"):
        load_folders(root)
    info, _ = load_folders(root, {"background": 0, "lesion": 254, "a": 3, "b": 127})
    assert info.label_values == [0, 3, 127, 254]
    # a grayscale image given as a mask: 0..255 consecutive, but 256 classes
    gray = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) % 256
    root = _folders(tmp_path / "gray", images, {"c0.png": gray.astype(np.uint8), "c1.png": _mask()})
    with pytest.raises(ValueError, match=r"hold 256 values .* up to 32 classes"):
        load_folders(root)
    # consecutive labels and binary 0/v masks are taken
    root = _folders(tmp_path / "ok", images, {"c0.png": three, "c1.png": _mask()})
    assert load_folders(root)[0].label_values == [0, 1, 2]
    root = _folders(tmp_path / "binary", images, {"c0.png": _mask() * 255, "c1.png": _mask(3) * 255})
    assert load_folders(root)[0].label_values == [0, 255]


def test_a_declared_class_no_training_mask_holds_is_named_and_left_out_of_the_mean(tmp_path, caplog):
    images = {f"c{i}.png": (np.random.default_rng(i).random((32, 32)) * 255).astype(np.uint8) for i in range(4)}
    root = _folders(tmp_path / "absent", images, {f"c{i}.png": _mask(i) for i in range(4)})
    labels = {"background": 0, "cell": 1, "nucleus": 2}
    config = tiny_train_config(data=dict(format="folders", root=root, fold="all", labels=labels),
                               train={"num_epochs": 2})
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(config, str(tmp_path / "run"))
    assert "'nucleus' (value 2) are declared (data.labels) but no training mask of fold all contains them" in caplog.text
    history = trainer.run()
    assert all(np.isfinite(row["val_dice_mean"]) and row["val_dice_mean"] == row["val_dice_cell"] for row in history)
    assert (tmp_path / "run" / "checkpoint_best" / "model.safetensors").is_file()
    # summarize: an excluded class is reported but not averaged; a predicted-absent class would be Dice 0
    counts = torch.tensor([[10, 0, 0], [5, 5, 0], [0, 3, 0]])
    assert summarize(counts, ["bg", "cell", "nucleus"])["dice_mean"] == pytest.approx(2 / 3 / 2)
    scores = summarize(counts, ["bg", "cell", "nucleus"], exclude=[2])
    assert scores["dice_mean"] == pytest.approx(2 / 3) and scores["dice_nucleus"] == 0.0


def test_dataset_json_channel_count_must_match_the_files(tmp_path):
    root = write_demo_dataset(str(tmp_path / "Dataset001_Demo"), num_train=3, num_test=0, size=32)
    meta = json.loads((tmp_path / "Dataset001_Demo" / "dataset.json").read_text())
    meta["channel_names"] = {"0": "R", "1": "G", "2": "B"}
    (tmp_path / "Dataset001_Demo" / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"dataset.json declares 3 channel\(s\) in channel_names but the images in "
                                         r".*imagesTr' hold 1"):
        load_nnunet_raw(root)


# ---------------------------------------------------------------------------- JSON files
def test_malformed_json_names_the_file_and_line(tmp_path, capsys):
    from upernet_vit.cli import main

    root = write_demo_dataset(str(tmp_path / "Dataset001_Demo"), num_train=3, num_test=0, size=32)
    path = tmp_path / "Dataset001_Demo" / "dataset.json"
    path.write_text(path.read_text().replace('"labels": {', '"labels": {,', 1))
    with pytest.raises(ValueError, match=r"dataset.json is not valid JSON: .* at line \d+, column \d+"):
        load_nnunet_raw(root)
    splits = tmp_path / "splits_final.json"
    splits.write_text('[{"train": ["a"], "val": ["b"]}\n{"train": []}]')
    with pytest.raises(ValueError, match=r"splits_final.json is not valid JSON: Expecting ',' delimiter at line 2"):
        fold_case_ids(["a", "b"], "0", str(splits))
    labels = tmp_path / "labels.json"
    labels.write_text('{"background": 0,\n "tumor": 1,\n}')
    (tmp_path / "p").mkdir()
    assert main(["evaluate", "--pred", str(tmp_path / "p"), "--gt", str(tmp_path / "p"), "--labels", str(labels)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "labels.json is not valid JSON: Expecting property name enclosed in double quotes at line 3" in line


def test_dataset_json_labels_must_be_consecutive_and_not_region_based(tmp_path):
    root = write_demo_dataset(str(tmp_path / "Dataset001_Demo"), num_train=2, num_test=0, size=16)
    path = tmp_path / "Dataset001_Demo" / "dataset.json"
    meta = json.loads(path.read_text())
    for labels, message in (({"background": 0, "disk": 2}, r"labels must be consecutive 0\.\.K-1 as nnU-Net requires"),
                            ({"background": 0, "whole": [1, 2]}, r"label 'whole' is \[1, 2\]; region-based labels are not supported")):
        path.write_text(json.dumps({**meta, "labels": labels}))
        with pytest.raises(ValueError, match=message):
            load_nnunet_raw(root)


def test_a_splits_file_naming_unknown_cases_or_an_empty_side_is_refused_and_fold_all_uses_every_case(tmp_path):
    ids = ["a", "b", "c", "d"]
    splits = tmp_path / "splits_final.json"
    splits.write_text(json.dumps([{"train": ["a", "b", "x"], "val": ["c"]}]))
    with pytest.raises(ValueError, match=r"names cases that are not in the dataset: \['x'\]"):
        fold_case_ids(ids, "0", str(splits))
    splits.write_text(json.dumps([{"train": ["a", "b", "c", "d"], "val": []}]))
    with pytest.raises(ValueError, match=r"fold 0 of .*splits_final.json has 4 training and 0 validation cases"):
        fold_case_ids(ids, "0", str(splits))
    train, val, _ = fold_case_ids(ids, "all")
    assert train == val == ids
    ten = [f"c{i}" for i in range(10)]
    train, val, generated = fold_case_ids(ten, "1")  # generated folds: disjoint, together every case
    assert not set(train) & set(val) and sorted(train + val) == ten and len(generated) == 5 and len(val) == 2
