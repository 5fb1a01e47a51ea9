"""Data loading and checks, folds, augmentation, losses, metrics, sliding window."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from upernet_vit.config import load_config
from upernet_vit.config import AugmentationConfig
from upernet_vit.data.augment import PatchDataset
from upernet_vit.data.normalization import Normalizer
from upernet_vit.data.datasets import IGNORE_INDEX, load_folders, load_nnunet_raw
from upernet_vit.data.splits import crossval_splits
from upernet_vit.data.demo import demo_case, write_demo_dataset
from upernet_vit.data.image_io import read_image, read_label
from upernet_vit.inference.sliding_window import gaussian_importance, sliding_window_logits, window_starts
from upernet_vit.training.losses import DiceCELoss
from upernet_vit.inference.metrics import confusion_counts, dice_iou, summarize
from upernet_vit.training.trainer import Trainer
from helpers import TINY


def test_demo_data_is_deterministic_and_has_all_classes():
    a, b = demo_case(3), demo_case(3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], demo_case(4)[0])
    labels = set().union(*(np.unique(demo_case(i)[1]).tolist() for i in range(20)))
    assert labels == {0, 1, 2, 3}
    assert a[0].shape == (1, 96, 96) and a[0].dtype == np.float32 and 0 <= a[0].min() and a[0].max() <= 1


def test_crossval_splits_match_nnunet_sklearn_kfold():
    sklearn = pytest.importorskip("sklearn.model_selection")
    ids = [f"case_{i:03d}" for i in range(23)]
    ours = crossval_splits(list(reversed(ids)))
    kfold = sklearn.KFold(n_splits=5, shuffle=True, random_state=12345)
    for split, (train_idx, val_idx) in zip(ours, kfold.split(ids)):
        assert split["train"] == [ids[i] for i in train_idx]
        assert split["val"] == [ids[i] for i in val_idx]


@pytest.fixture
def nnunet_dataset(tmp_path):
    return write_demo_dataset(str(tmp_path / "Dataset001_Demo"), num_train=6, num_test=2, size=32)


def test_nnunet_raw_loads(nnunet_dataset):
    info, cases = load_nnunet_raw(nnunet_dataset)
    assert info.label_names == ["background", "disk", "square", "triangle"] and info.num_channels == 1
    assert len(cases) == 6 and cases[0].image.shape == (1, 32, 32)
    assert np.array_equal(cases[0].label, demo_case(0, 32)[1])


def test_rgb_stays_in_one_file_and_16bit_tiff(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert read_image(str(tmp_path / "rgb.png")).shape == (3, 10, 12)
    deep = np.full((5, 6), 65535, dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.tif")
    img = read_image(str(tmp_path / "deep.tif"))
    assert img.shape == (1, 5, 6) and np.all(img == 65535.0)  # values as stored (training/intensity.py)


def _break(root, what):
    if what == "missing label":
        os.remove(os.path.join(root, "labelsTr", "demo_002.png"))
        return r"demo_002_0000.png.*has no label"
    if what == "bad value":
        Image.fromarray(np.full((32, 32), 7, dtype=np.uint8)).save(os.path.join(root, "labelsTr", "demo_001.png"))
        return r"demo_001.png.*values \[7\] that are not among"
    if what == "size mismatch":
        Image.fromarray(np.zeros((30, 32), dtype=np.uint8)).save(os.path.join(root, "labelsTr", "demo_003.png"))
        return r"demo_003_0000.png.*32x32.*demo_003.png.*30x32"
    if what == "corrupt":
        with open(os.path.join(root, "imagesTr", "demo_004_0000.png"), "wb") as f:
            f.write(b"not a png")
        return r"cannot read image file .*demo_004_0000.png"
    if what == "no dataset.json":
        os.remove(os.path.join(root, "dataset.json"))
        return r"dataset.json not found"
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["missing label", "bad value", "size mismatch", "corrupt", "no dataset.json"])
def test_bad_datasets_fail_before_training_naming_the_file(nnunet_dataset, what, tmp_path):
    message = _break(nnunet_dataset, what)
    cfg = load_config({"model": {"backbone": "vit_small_patch16_224", "backbone_size": None, "backbone_kwargs": TINY},
                       "data": {"format": "nnunet", "root": nnunet_dataset, "patch_size": [32, 32], "fold": "all"}})
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        Trainer(cfg, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoint_latest")


def test_missing_dataset_folder_and_small_patch(tmp_path, nnunet_dataset):
    base = {"model": {"backbone": "vit_small_patch16_224", "backbone_size": None, "backbone_kwargs": TINY}}
    cfg = load_config({**base, "data": {"format": "nnunet", "root": str(tmp_path / "nope")}})
    with pytest.raises(FileNotFoundError, match="nope.*does not exist"):
        Trainer(cfg, str(tmp_path / "run"))
    cfg = load_config({**base, "data": {"format": "nnunet", "root": nnunet_dataset, "patch_size": [8, 32], "fold": "all"}})
    with pytest.raises(ValueError, match=r"patch_size \[8, 32\].*>= the backbone patch \(16 px"):
        Trainer(cfg, str(tmp_path / "run"))


def test_plain_folders_with_any_label_values(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "images" / f"im{i}.jpg")
        mask = np.zeros((8, 8), dtype=np.uint8)
        mask[:4] = 255
        Image.fromarray(mask).save(tmp_path / "masks" / f"im{i}.png")
    info, cases = load_folders(str(tmp_path))
    assert info.label_values == [0, 255] and info.num_channels == 3
    assert set(np.unique(cases[0].label)) == {0, 1}
    assert np.array_equal(info.to_values(cases[0].label), read_label(str(tmp_path / "masks" / "im0.png")))


def test_augmentation_keeps_image_and_mask_aligned():
    """An image that encodes its own label: after crop/zoom/flip/rotation they must still agree."""
    _, label = demo_case(1, 64)
    case = type("C", (), {})()
    from upernet_vit.data.datasets import Case

    case = Case("x", (label[None] / 3.0).astype(np.float32), label)
    aug = AugmentationConfig(scale_range=[0.7, 1.4], rotation_degrees=180, flip=True, intensity=False)
    ds = PatchDataset([case], (48, 40), Normalizer([0.0], [1.0]), 16, 0, aug)
    agree = []
    for i in range(16):
        image, mask = ds[i]
        assert image.shape == (1, 48, 40) and mask.shape == (48, 40) and mask.dtype == torch.int64
        valid = mask != IGNORE_INDEX
        agree.append(((image[0] * 3).round().long()[valid] == mask[valid]).float().mean())
    assert torch.stack(agree).mean() > 0.95
    again = ds[5]
    assert torch.equal(again[0], ds[5][0])  # a pure function of (seed, epoch, index)
    ds.set_epoch(1)
    assert not torch.equal(again[0], ds[5][0])


def test_dice_ce_loss_properties():
    loss = DiceCELoss()
    target = torch.randint(0, 3, (2, 8, 8))
    perfect = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 50
    assert loss(perfect, target) < 1e-3
    logits = torch.randn(2, 3, 8, 8)
    assert loss(logits, target) > 0.5
    # ignored pixels do not matter
    ignored = target.clone()
    ignored[:, :4] = IGNORE_INDEX
    changed = logits.clone()
    changed[:, :, :4] = torch.randn(2, 3, 4, 8) * 10
    assert torch.allclose(loss(logits, ignored), loss(changed, ignored))
    assert torch.isfinite(loss(logits, torch.full_like(target, IGNORE_INDEX)))


def test_class_weights_weight_the_ce_term_by_the_formula():
    from upernet_vit.training.losses import SoftDiceLoss, inverse_frequency_weights

    torch.manual_seed(3)
    logits, target = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    target[0, 0] = IGNORE_INDEX
    w = torch.tensor([0.2, 1.0, 5.0])
    weighted = DiceCELoss(class_weights=w.tolist())(logits, target)
    # by hand: sum_i w[y_i] * (-log p_i[y_i]) / sum_i w[y_i] over labelled pixels, plus the unweighted Dice
    valid = target != IGNORE_INDEX
    logp = logits.log_softmax(1).permute(0, 2, 3, 1)[valid]
    y = target[valid]
    ce = -(w[y] * logp[torch.arange(len(y)), y]).sum() / w[y].sum()
    assert torch.allclose(weighted, ce + SoftDiceLoss()(logits, target), atol=1e-6)
    assert not torch.allclose(weighted, DiceCELoss()(logits, target))
    # auto: N / (K * n_c) over labelled pixels; an absent class gets 1
    labels = [torch.tensor([[0, 0, 0, 1], [0, 0, 1, IGNORE_INDEX]])]
    assert inverse_frequency_weights(labels, 3) == pytest.approx([7 / (3 * 5), 7 / (3 * 2), 1.0])


def test_class_weights_in_training_are_checked_and_auto_is_logged(tmp_path, caplog):
    import logging

    from helpers import tiny_train_config

    with pytest.raises(ValueError, match=r"class_weights has 2 values but the dataset has 4 classes \['background'"):
        Trainer(tiny_train_config(train={"class_weights": [1.0, 2.0]}), str(tmp_path / "a"))
    given = Trainer(tiny_train_config(train={"class_weights": [0.5, 1, 2, 3]}), str(tmp_path / "b"))
    assert given.criterion.class_weights.tolist() == [0.5, 1, 2, 3]
    with caplog.at_level(logging.INFO):
        auto = Trainer(tiny_train_config(train={"class_weights": "auto"}), str(tmp_path / "c"))
    assert "class_weights auto" in caplog.text and "background" in caplog.text
    weights = auto.criterion.class_weights
    assert weights[0] < 1 < weights[1]  # background is the most frequent class of the demo data


def test_dice_by_hand():
    truth = torch.tensor([[0, 1, 1, 2], [0, 1, 2, 2]])
    pred = torch.tensor([[0, 1, 0, 2], [1, 1, 2, 0]])
    counts = confusion_counts(pred, truth, 3)
    # class 1: tp 2, fp 1, fn 1 -> dice 4/6; class 2: tp 2, fp 0, fn 1 -> dice 4/5
    assert counts[1].tolist() == [2, 1, 1] and counts[2].tolist() == [2, 0, 1]
    scores = dice_iou(counts)
    assert scores["dice"][1] == pytest.approx(4 / 6) and scores["iou"][2] == pytest.approx(2 / 3)
    summary = summarize(counts, ["bg", "a", "b"])
    assert summary["dice_mean"] == pytest.approx((4 / 6 + 4 / 5) / 2)
    assert np.isnan(dice_iou(confusion_counts(pred, truth, 4))["dice"][3])  # absent class -> NaN


def test_sliding_window_covers_and_matches_whole_image_for_a_local_model():
    assert window_starts(100, 32, 0.5) == [0, 14, 27, 41, 54, 68]  # nnU-Net: ceil(68 / 16) + 1 windows
    assert window_starts(20, 32, 0.5) == [0]
    w = gaussian_importance((16, 12))
    assert w.shape == (16, 12) and w.min() > 0 and w.max() == 1

    class PixelModel(torch.nn.Module):  # per-pixel: windows must reproduce the whole-image result
        def forward(self, x):
            return torch.cat([x, -x], dim=1)

    image = torch.randn(1, 45, 70)
    out = sliding_window_logits(PixelModel(), image, (16, 32), mirror=True)
    assert out.shape == (2, 45, 70)
    assert torch.allclose(out, PixelModel()(image[None])[0], atol=1e-5)


def test_zscore_uses_whole_image_statistics():
    from upernet_vit.data.datasets import Case

    rng = np.random.default_rng(0)
    image = rng.normal(3.0, 2.0, (1, 40, 40)).astype(np.float32)
    image[:, :20] += 10  # a patch from one half has other statistics than the image
    case = Case("z", image, np.zeros((40, 40), dtype=np.int64))
    normalizer = Normalizer([0.0], [1.0], mode="zscore")
    ds = PatchDataset([case], (40, 40), normalizer, 2, 0, None)  # no augmentation: the whole image
    patch, _ = ds[0]
    assert torch.allclose(patch, normalizer(torch.from_numpy(image)), atol=1e-5)


def test_rotation_is_bilinear_for_images_and_nearest_for_masks():
    from upernet_vit.data.datasets import Case

    label = np.zeros((32, 32), dtype=np.int64)
    label[8:24, 8:24] = 2
    case = Case("r", (label[None] / 2.0).astype(np.float32), label)
    aug = AugmentationConfig(scale_range=[1.0, 1.0], rotation_degrees=45, flip=False, intensity=False)
    image, mask = PatchDataset([case], (32, 32), Normalizer([0.0], [1.0]), 1, 3, aug)[0]
    assert ((image > 0.05) & (image < 0.95)).any()  # interpolated edge values
    assert set(mask.unique().tolist()) <= {0, 2, IGNORE_INDEX}


def test_named_splits_file_must_exist_and_folds_must_be_disjoint(tmp_path):
    from upernet_vit.data.splits import fold_case_ids

    ids = [f"c{i}" for i in range(6)]
    with pytest.raises(FileNotFoundError, match="splits.json"):
        fold_case_ids(ids, "0", str(tmp_path / "splits.json"), required=True)
    (tmp_path / "splits.json").write_text(json.dumps([{"train": ["c0", "c1"], "val": ["c1"]}]))
    with pytest.raises(ValueError, match=r"both train and val: \['c1'\]"):
        fold_case_ids(ids, "0", str(tmp_path / "splits.json"))


def test_image_modes(tmp_path):
    Image.fromarray(np.full((4, 5), 65535, dtype=np.int32), mode="I").save(tmp_path / "i32.tif")
    assert np.all(read_image(str(tmp_path / "i32.tif")) == 65535.0)
    gray = Image.fromarray(np.arange(20, dtype=np.uint8).reshape(4, 5), mode="L").convert("P")
    gray.save(tmp_path / "pal.png")
    assert read_image(str(tmp_path / "pal.png")).shape == (1, 4, 5)
    rgba = np.zeros((4, 5, 4), dtype=np.uint8)
    rgba[..., :3] = 2
    rgba[..., 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "mask.png")
    assert (read_label(str(tmp_path / "mask.png")) == 2).all()


def test_cli_fast_path_flags():
    from upernet_vit.cli import _fast_paths, build_parser

    parser = build_parser()
    for command in (["train", "c.yaml"], ["predict", "--model", "m", "--input", "i", "--output", "o"]):
        assert _fast_paths(parser.parse_args(command)) == {"winograd": False}
        assert _fast_paths(parser.parse_args(command + ["--winograd"])) == {"winograd": True}
        assert _fast_paths(parser.parse_args(command + ["--reference"])) is None
        with pytest.raises(SystemExit):
            parser.parse_args(command + ["--reference", "--winograd"])


def test_foreground_oversampling_draws_its_share_from_cases_with_foreground():
    """nnU-Net's oversampling (trainer.FOREGROUND_FRACTION for volumes' slices): a third of the samples come
    from the cases that hold foreground, the rest from all cases."""
    from upernet_vit.data.datasets import Case
    from upernet_vit.training.trainer import FOREGROUND_FRACTION

    background = [Case(f"b{i}", np.zeros((1, 8, 8), np.float32), np.zeros((8, 8), np.int64)) for i in range(9)]
    label = np.zeros((8, 8), np.int64)
    label[2:6, 2:6] = 1
    cases = background + [Case("f", np.ones((1, 8, 8), np.float32), label)]

    def share(fraction):
        ds = PatchDataset(cases, (8, 8), Normalizer([0.0], [1.0]), 3000, 0, None, fraction)
        return np.mean([bool((ds[i][1] > 0).any()) for i in range(len(ds))])

    assert FOREGROUND_FRACTION == pytest.approx(1 / 3)
    assert abs(share(0.0) - 0.1) < 0.02  # one case in ten
    assert abs(share(FOREGROUND_FRACTION) - (1 / 3 + 2 / 3 * 0.1)) < 0.03


def test_two_files_of_one_case_are_an_error_not_a_silent_pick(tmp_path):
    for kind in ("images", "masks"):
        (tmp_path / kind).mkdir()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / kind / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "images" / "a.tif")
    with pytest.raises(ValueError, match=r"a.png' and .*a.tif' are one case 'a'"):
        load_folders(str(tmp_path))


def test_pixels_from_outside_the_image_are_zero_and_ignored():
    """A patch larger than its image is padded: 0 in the image, IGNORE_INDEX in the mask (no loss there)."""
    from upernet_vit.data.datasets import Case

    case = Case("x", np.ones((1, 16, 12), np.float32), np.ones((16, 12), np.int64))
    aug = AugmentationConfig(scale_range=[1.0, 1.0], rotation_degrees=0, flip=False, intensity=False)
    image, mask = PatchDataset([case], (32, 32), Normalizer([0.0], [1.0]), 4, 0, aug)[0]
    assert (mask == 1).sum() == 16 * 12 and ((mask == 1) | (mask == IGNORE_INDEX)).all()
    assert (image[0][mask == IGNORE_INDEX] == 0).all() and (image[0][mask == 1] == 1).all()


def test_the_auxiliary_loss_adds_its_weight_times_the_criterion():
    from upernet_vit.training.losses import segmentation_loss

    torch.manual_seed(0)
    logits, aux, target = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    criterion = DiceCELoss(3)
    main = criterion(logits, target)
    assert torch.equal(segmentation_loss(criterion, logits, target), main)
    assert torch.allclose(segmentation_loss(criterion, logits, target, aux, 0.4), main + 0.4 * criterion(aux, target))


def test_no_weight_decay_on_norms_biases_and_tokens_and_sgd_is_nesterov():
    from upernet_vit.config import TrainConfig
    from upernet_vit.training.optim import build_optimizer
    from helpers import tiny_model

    model = tiny_model(in_chans=1, num_classes=2)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.05), model.backbone.depth)
    decay = {names[id(p)]: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay["backbone.vit.pos_embed"] == 0.0 and decay["backbone.vit.cls_token"] == 0.0
    assert all(wd == 0.0 for n, wd in decay.items() if n.endswith(".bias") or "norm" in n)
    assert decay["backbone.vit.blocks.0.attn.qkv.weight"] == 0.05 and decay["backbone.vit.patch_embed.proj.weight"] == 0.05
    assert len(decay) == sum(p.requires_grad for p in model.parameters())  # every trainable parameter, once
    sgd = build_optimizer(model, TrainConfig(optimizer="sgd"), model.backbone.depth)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] > 0
