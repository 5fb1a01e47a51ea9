"""Images as a viewer shows them (issue 25): EXIF orientation applied to images and masks in training,
predict and evaluate; every page of a multi-page TIFF or animated PNG accounted for, never page 1 alone."""
import json

import numpy as np
import pytest
from PIL import Image

from upernet_vit.data.datasets import load_folders
from upernet_vit.data import image_io
from upernet_vit.data.image_io import read_image, read_label
from helpers import one_error_line, saved_8bit_model

pytestmark = pytest.mark.reliability  # what a user's bad input, damaged file or crash leads to

ROTATE_180, ROTATE_90_CW = 3, 6  # EXIF Orientation values: how the stored pixels are to be turned for display


def _exif(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _shown_mask(height=64, width=96):
    """A label map as the user sees and draws it: class 1 in the top-left quarter."""
    mask = np.zeros((height, width), np.uint8)
    mask[: height // 2, : width // 2] = 1
    return mask


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return saved_8bit_model(tmp_path_factory.mktemp("model") / "m")


# ---------------------------------------------------------------------------- EXIF orientation
def test_training_jpegs_stored_upside_down_with_tag_3_line_up_with_masks_drawn_as_shown(tmp_path):
    """Issue 25, bad case 2: phone JPEGs stored rotated 180° (tag 3) trained upside down against their
    masks, exit 0; now the image is turned as a viewer shows it."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(2):
        shown = _shown_mask() * 200 + 20  # bright where the mask is 1
        stored = np.rot90(shown, 2)
        Image.fromarray(stored.astype(np.uint8)).save(root / "images" / f"p{i}.jpg", exif=_exif(ROTATE_180), quality=95)
        Image.fromarray(_shown_mask()).save(root / "masks" / f"p{i}.png")
    _, cases = load_folders(str(root))
    for case in cases:
        assert np.array_equal(case.image[0] > 110, case.label == 1)  # JPEG-blurred edges stay on their side


def test_a_tag_6_photo_loads_with_a_mask_drawn_as_shown_and_a_stored_pixel_mask_is_named_as_turned(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    shown = _shown_mask() * 200 + 20  # 64 x 96 as shown
    stored = np.rot90(shown, 1)  # stored 96 x 64; tag 6 turns it 90° clockwise back
    Image.fromarray(stored.astype(np.uint8)).save(root / "images" / "p.jpg", exif=_exif(ROTATE_90_CW), quality=95)
    Image.fromarray(_shown_mask()).save(root / "masks" / "p.png")
    _, (case,) = load_folders(str(root))
    assert case.image.shape == (1, 64, 96) and np.array_equal(case.image[0] > 110, case.label == 1)
    Image.fromarray(np.rot90(_shown_mask(), 1)).save(root / "masks" / "p.png")  # drawn on the stored pixels
    with pytest.raises(ValueError, match=r"is 64x96 but its label .* is 96x64; .*each other's turn by 90°: files are "
                                         r"read as a viewer shows them, with their EXIF orientation applied \(the "
                                         r"image has orientation tag 6 \(rotated 90° clockwise\), the label no "
                                         r"orientation tag\)"):
        load_folders(str(root))


def test_predict_writes_masks_in_the_shown_orientation(tmp_path, model_folder):
    """A PNG stored turned with tag 6 gives the mask of the same picture stored as shown: same size, same
    pixels (before: the mask of the stored pixels, 96 x 64)."""
    from upernet_vit.inference.predict import predict

    shown = np.random.default_rng(0).integers(0, 256, (40, 56)).astype(np.uint8)
    (tmp_path / "tagged").mkdir()
    (tmp_path / "plain").mkdir()
    Image.fromarray(np.ascontiguousarray(np.rot90(shown, 1))).save(tmp_path / "tagged" / "x.png", exif=_exif(ROTATE_90_CW))
    Image.fromarray(shown).save(tmp_path / "plain" / "x.png")
    (tagged,) = predict(model_folder, str(tmp_path / "tagged"), str(tmp_path / "out1"), device="cpu")
    (plain,) = predict(model_folder, str(tmp_path / "plain"), str(tmp_path / "out2"), device="cpu")
    assert read_label(tagged).shape == (40, 56)
    assert np.array_equal(read_label(tagged), read_label(plain))
    assert Image.open(tagged).getexif().get(0x0112) is None  # no tag written: viewers show it as stored


def test_evaluate_reads_a_tagged_ground_truth_as_shown(tmp_path):
    from upernet_vit.inference.evaluate import evaluate

    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    Image.fromarray(np.ascontiguousarray(np.rot90(_shown_mask(), 2))).save(tmp_path / "gt" / "c.png", exif=_exif(ROTATE_180))
    Image.fromarray(_shown_mask()).save(tmp_path / "pred" / "c.png")
    summary = evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"))
    assert summary["dice"]["class_1"] == 1.0


# ---------------------------------------------------------------------------- multi-page files
def _stack(path, pages, **save):
    frames = [Image.fromarray(p) for p in pages]
    frames[0].save(path, save_all=True, append_images=frames[1:], **save)


def test_a_multi_page_training_image_or_mask_is_refused_naming_its_page_count(tmp_path):
    """Issue 25, bad case 1: a 3-page z-stack trained on page 1 alone, silently."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    _stack(root / "images" / "z.tif", [np.full((16, 16), 10 * i, np.uint8) for i in range(3)])
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "masks" / "z.png")
    with pytest.raises(ValueError, match=r"image file .*z.tif' has 3 pages .*a training image is one 2D page. Save "
                                         r"each page as a file of its own"):
        load_folders(str(root))
    (root / "images" / "z.tif").unlink()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "images" / "z.png")
    _stack(root / "masks" / "z.png", [np.zeros((16, 16), np.uint8)] * 2)  # an animated PNG
    with pytest.raises(ValueError, match=r"label file .*z.png' has 2 pages"):
        load_folders(str(root))


def test_predict_reads_a_z_stack_page_by_page_and_writes_a_multi_page_mask(tmp_path, model_folder):
    """Before: one mask, whose probabilities equalled page 1's; pages 2-3 ignored without a word."""
    from upernet_vit.inference.predict import predict

    rng = np.random.default_rng(1)
    pages = [rng.integers(0, 256, (24, 40)).astype(np.uint8) for _ in range(3)]
    (tmp_path / "stack").mkdir()
    (tmp_path / "single").mkdir()
    _stack(tmp_path / "stack" / "z.tif", pages)
    for i, page in enumerate(pages):
        Image.fromarray(page).save(tmp_path / "single" / f"page{i}.png")
    (mask,) = predict(model_folder, str(tmp_path / "stack"), str(tmp_path / "out"), device="cpu",
                      save_probabilities=True)
    assert mask.endswith("z.tif")
    stack = image_io.read_label_pages(mask)
    singles = predict(model_folder, str(tmp_path / "single"), str(tmp_path / "out_single"), device="cpu")
    assert stack.shape == (3, 24, 40)
    assert all(np.array_equal(stack[i], read_label(singles[i])) for i in range(3))
    probs = np.load(tmp_path / "out" / "z_probs.npz")["probabilities"]
    assert probs.shape == (3, 2, 24, 40) and not np.allclose(probs[0], probs[1])  # each page its own
    record = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert set(record["files"]) == {"z.tif", "z_probs.npz"}


def test_an_animated_png_is_a_stack_too_and_evaluate_scores_stacks_page_by_page(tmp_path):
    from upernet_vit.inference.evaluate import evaluate

    _stack(tmp_path / "a.png", [np.full((8, 8), v, np.uint8) for v in (0, 50, 100)])
    with pytest.raises(ValueError, match=r"a.png' has 3 pages"):
        read_image(str(tmp_path / "a.png"))
    pages, integer = image_io.read_image_pages(str(tmp_path / "a.png"))
    assert integer and [p[0, 0, 0] for p in pages] == [0.0, 50.0, 100.0]

    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    truth = [np.zeros((8, 8), np.uint8), np.ones((8, 8), np.uint8)]
    _stack(tmp_path / "gt" / "z.tif", truth)
    _stack(tmp_path / "pred" / "z.tif", [truth[0], truth[0]])  # page 2 all wrong
    summary = evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"))
    assert summary["dice"]["class_1"] == 0.0 and summary["dice"]["background"] == pytest.approx(2 / 3)
    _stack(tmp_path / "pred" / "z.tif", truth[:1] * 3)
    with pytest.raises(ValueError, match=r"is 8x8 with 3 pages but its ground truth .* is 8x8 with 2 pages"):
        evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"))


def test_a_camera_mpo_jpeg_is_one_photo_not_a_stack(tmp_path):
    """Cameras and phones store previews (or an HDR gain map) as further frames of an MPO JPEG."""
    photo = Image.fromarray(np.full((16, 24), 200, np.uint8))
    photo.save(tmp_path / "p.jpg", format="MPO", save_all=True, append_images=[photo.resize((12, 8))])
    assert Image.open(tmp_path / "p.jpg").n_frames == 2
    assert read_image(str(tmp_path / "p.jpg")).shape == (1, 16, 24)


def test_a_tiff_whose_orientation_turns_it_is_refused_not_garbled(tmp_path, capsys, model_folder):
    """Pillow reads the pixels of a TIFF with orientation 5-8 garbled: refused, naming the tag."""
    from upernet_vit.cli import main

    (tmp_path / "in").mkdir()
    Image.fromarray(np.arange(6, dtype=np.uint8).reshape(2, 3)).save(tmp_path / "in" / "t.tif", tiffinfo={274: 6})
    assert main(["predict", "--model", model_folder, "--input", str(tmp_path / "in"), "--output",
                 str(tmp_path / "out")]) == 2
    line = one_error_line(capsys.readouterr().err, "predict")
    assert "it is a TIFF with orientation tag 6 (rotated 90° clockwise), whose pixels Pillow does not read" in line
    assert not (tmp_path / "out").exists()
    Image.fromarray(np.arange(6, dtype=np.uint8).reshape(2, 3)).save(tmp_path / "t3.tif", tiffinfo={274: 3})
    assert np.array_equal(read_image(str(tmp_path / "t3.tif"))[0], np.arange(6).reshape(2, 3)[::-1, ::-1])


# ---------------------------------------------------------------------------- label files, written and read
def test_label_files_are_8_bit_below_256_and_16_bit_from_256(tmp_path):
    small, large = np.array([[0, 1], [2, 255]]), np.array([[0, 1], [256, 40000]])
    image_io.write_label_png(str(tmp_path / "small.png"), small)
    image_io.write_label_png(str(tmp_path / "large.png"), large)
    assert Image.open(tmp_path / "small.png").mode == "L" and Image.open(tmp_path / "large.png").mode.startswith("I")
    assert (read_label(str(tmp_path / "small.png")) == small).all() and (read_label(str(tmp_path / "large.png")) == large).all()
    image_io.write_label_stack(str(tmp_path / "stack.tif"), np.stack([small, large]))  # one dtype for all pages
    with Image.open(tmp_path / "stack.tif") as stack:
        assert stack.n_frames == 2 and stack.mode.startswith("I")
    assert (image_io.read_label_pages(str(tmp_path / "stack.tif")) == np.stack([small, large])).all()
    with pytest.raises(ValueError, match=r"label values must be in 0\.\.65535 .* got -1\.\.2"):
        image_io.write_label_png(str(tmp_path / "negative.png"), np.array([[-1, 2]]))
    assert not (tmp_path / "negative.png").exists()


def test_an_rgb_mask_of_unequal_channels_and_a_float_mask_with_fractions_are_refused(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "gray_rgb.png")
    assert (read_label(str(tmp_path / "gray_rgb.png")) == 0).all()  # equal channels: one label map
    rgb[0, 0] = (255, 0, 0)
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    with pytest.raises(ValueError, match=r"colour.png' has 3 different channels; a label map must be one channel"):
        read_label(str(tmp_path / "colour.png"))
    Image.fromarray(np.array([[0.0, 1.0], [2.0, 3.0]], np.float32)).save(tmp_path / "whole.tif")
    assert read_label(str(tmp_path / "whole.tif")).tolist() == [[0, 1], [2, 3]]
    Image.fromarray(np.array([[0.0, 1.5]], np.float32)).save(tmp_path / "fraction.tif")
    with pytest.raises(ValueError, match=r"fraction.tif' holds non-integer values"):
        read_label(str(tmp_path / "fraction.tif"))


def test_predict_writes_the_label_values_the_model_was_trained_on(tmp_path):
    """Values in, values out: a model trained on 0/255 masks writes 0/255 masks, the same pixels as the
    same weights recorded with 0/1."""
    from helpers import record_8bit, tiny_model
    from upernet_vit.cli import main

    model = tiny_model(in_chans=1, num_classes=2)
    for name, values in (("m01", [0, 1]), ("m255", [0, 255])):
        model.preprocessing = {**record_8bit(model), "label_values": values}
        model.save_pretrained(tmp_path / name)
    (tmp_path / "in").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8)).save(tmp_path / "in" / "a.png")
    for name in ("m01", "m255"):
        assert main(["predict", "--model", str(tmp_path / name), "--input", str(tmp_path / "in"),
                     "--output", str(tmp_path / f"out_{name}")]) == 0
    zero_one, zero_255 = read_label(str(tmp_path / "out_m01" / "a.png")), read_label(str(tmp_path / "out_m255" / "a.png"))
    assert set(np.unique(zero_one)) == {0, 1} and set(np.unique(zero_255)) == {0, 255}  # both classes drawn
    assert (zero_255 == 255 * zero_one).all()
