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


def _train_and_predict(root, tmp_path):
    """Train a tiny 2.5-D stack model on ``root`` for one epoch, predict its images; the output folder."""
    config = tiny_train_config(data={"format": "folders", "root": str(root), "stacks": True, "context_slices": 1,
                                     "patch_size": [16, 16], "num_folds": 2}, train={"num_epochs": 1},
                               model={"decoder": {"aux_head": False}})
    Trainer(config, str(tmp_path / "run")).run()
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(tmp_path / "run"), "--input", str(root / "images"),
                 "--output", str(out), "--device", "cpu"]) == 0
    return out


def test_a_stack_model_predicts_a_stack_page_by_page_with_its_context(tmp_path):
    root = _dataset(tmp_path / "em", count=4)
    out = _train_and_predict(root, tmp_path)
    masks = read_label_pages(str(out / "em1.tif"))
    assert masks.shape == (5, 24, 20) and set(np.unique(masks)) <= {0, 1}


def _folder_dataset(root, count=2, pages=12, size=(24, 20)):
    """The multi-page dataset of :func:`_dataset`, each stack saved as a folder of one file per section,
    named s1 ... s12 (alphabetical order would put s10 second)."""
    tif = _dataset(root.parent / (root.name + "_tif"), count=count, pages=pages, size=size)
    for kind in ("images", "masks"):
        for i in range(count):
            folder = root / kind / f"em{i}"
            folder.mkdir(parents=True)
            with Image.open(tif / kind / f"em{i}.tif") as img:
                for p in range(pages):
                    img.seek(p)
                    img.save(folder / f"s{p + 1}.png")
    return root, tif


def test_section_files_come_in_natural_order_and_ambiguous_names_are_refused(tmp_path):
    from upernet_vit.data.image_io import section_files

    for name in ("s10.png", "s2.png", "s1.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.rsplit("/", 1)[1] for p in section_files(str(tmp_path))] == ["s1.png", "s2.png", "s10.png"]
    (tmp_path / "s01.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"'s01.png' and 's1.png' take one place|'s1.png' and 's01.png' take one place"):
        section_files(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        section_files(str(tmp_path / "empty"))


def test_a_folder_of_sections_trains_as_its_multi_page_file_does(tmp_path):
    root, tif = _folder_dataset(tmp_path / "em")
    def cases(where):
        cfg = load_config({"data": {"format": "folders", "root": str(where), "stacks": True, "context_slices": 1,
                                    "fold": "all"}}).data
        data = prepare_data(cfg, str(tmp_path / f"cache_{where.name}"))
        return {c.case_id: (c.pixels(), c.classes()) for c in data.train_cases}

    folders, files = cases(root), cases(tif)
    assert len(folders) == 24 and folders.keys() == files.keys()  # em0/0000 ... em1/0011
    assert all(np.array_equal(folders[k][0], files[k][0]) and np.array_equal(folders[k][1], files[k][1])
               for k in files)
    with pytest.raises(ValueError, match=r"is a folder: set data.stacks: true"):  # not declared
        prepare_data(load_config({"data": {"format": "folders", "root": str(root)}}).data)


def test_the_cache_sees_a_changed_section_file(tmp_path):
    from upernet_vit.data.cache import fingerprint

    root, _ = _folder_dataset(tmp_path / "em", count=1, pages=3)
    cfg = load_config({"data": {"format": "folders", "root": str(root), "stacks": True}}).data
    before = fingerprint(cfg)
    Image.fromarray(np.zeros((24, 20), np.uint8)).save(root / "masks" / "em0" / "s2.png")
    assert fingerprint(cfg) != before


def test_a_stack_folder_model_predicts_folders_and_evaluate_scores_them(tmp_path):
    root, _ = _folder_dataset(tmp_path / "em", count=4, pages=5)
    out = _train_and_predict(root, tmp_path)
    assert sorted(p.name for p in out.glob("*.tif")) == ["em0.tif", "em1.tif", "em2.tif", "em3.tif"]
    assert read_label_pages(str(out / "em1.tif")).shape == (5, 24, 20)
    assert main(["evaluate", "--pred", str(out), "--gt", str(root / "masks")]) == 0
    from upernet_vit.inference.evaluate import evaluate

    summary = evaluate(str(out), str(root / "masks"))
    case = summary["metric_per_case"][0]
    assert case["reference_file"].endswith("masks/em0") and case["metrics"]["1"]["n_ref"] == 5 * 8 * 9


def test_a_mask_stack_must_match_its_image_stack_page_for_page(tmp_path):
    root = _dataset(tmp_path / "em", count=2, pages=5)
    _stack(root / "masks" / "em1.tif", [np.zeros((24, 20), np.uint8)] * 4)  # one section short
    config = load_config({"data": {"format": "folders", "root": str(root), "stacks": True, "fold": "all"}}).data
    with pytest.raises(ValueError, match=r"stack '.*images/em1\.tif' has 5 page\(s\) of 24x20 but its label "
                                         r"'.*masks/em1\.tif' has 4 of 24x20; they must match page for page"):
        prepare_data(config, str(tmp_path / "cache"))
