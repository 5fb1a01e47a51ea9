"""predict, export and the command line never give a wrong or partial result with exit 0 (issues 11, 16):
flags in range, a best checkpoint that exists, outputs apart from the inputs, every input checked before
anything is written, output names and channel files that add up, one-line errors, progress on large images."""
import os
import re

import numpy as np
import pytest
from PIL import Image

from upernet_vit.cli import main
from upernet_vit.runs.checkpoints import checkpoint_epoch
from upernet_vit.training.trainer import Trainer
from helpers import config_file as _config_file, float_tiff as _float_tiff, gray as _gray
from helpers import one_error_line as _one_error_line, saved_8bit_model, tiny_model, tiny_train_config

pytestmark = pytest.mark.reliability  # what a user's bad input, damaged file or crash leads to


@pytest.fixture(scope="module")
def bare_model(tmp_path_factory):
    return saved_8bit_model(tmp_path_factory.mktemp("model") / "m")  # with a trained model's record


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "b"):
        _gray(folder / f"{name}.png")
    return folder


# ---------------------------------------------------------------------------- flags
@pytest.mark.parametrize("step,why", [("2", r"--step 2.0: .*in \[0.1, 1\]"), ("0", r"--step 0.0"), ("-0.5", r"--step -0.5"),
                                      ("nan", r"--step nan"), ("0.01", r"--step 0.01: .*over 100 times")])
def test_steps_outside_0_1_or_exploding_the_tile_count_are_refused(tmp_path, bare_model, images, capsys, step, why):
    """Issue 16: --step 2 left 59% of the pixels unpredicted (exit 0); 0 and negative steps crashed."""
    from upernet_vit.cli import main

    out = tmp_path / "out"
    assert main(["predict", "--model", bare_model, "--input", str(images), "--output", str(out), "--step", step]) == 2
    assert re.search(why, _one_error_line(capsys.readouterr().err, "predict"))
    assert not out.exists()


@pytest.mark.parametrize("scales", [["100"], ["0.1"], ["1", "inf"]])
def test_scales_outside_a_quarter_to_four_are_refused(tmp_path, bare_model, images, capsys, scales):
    from upernet_vit.cli import main

    out = tmp_path / "out"
    assert main(["predict", "--model", bare_model, "--input", str(images), "--output", str(out), "--scales", *scales]) == 2
    assert "give one or more factors in [0.25, 4]" in _one_error_line(capsys.readouterr().err, "predict")
    assert not out.exists()


def test_predict_on_a_device_this_machine_lacks_is_one_line(tmp_path, bare_model, images, capsys):
    import torch

    from upernet_vit.cli import main

    if torch.cuda.is_available():
        pytest.skip("this check needs a machine without CUDA; CI and this project's machines have none")
    assert main(["predict", "--model", bare_model, "--input", str(images), "--output", str(tmp_path / "o"),
                 "--device", "cuda"]) == 2
    assert "--device is 'cuda' but this machine has no CUDA device" in _one_error_line(capsys.readouterr().err, "predict")
    assert main(["predict", "--model", bare_model, "--input", str(images), "--output", str(tmp_path / "o"),
                 "--device", "gpu"]) == 2
    assert "--device 'gpu' is not a device" in _one_error_line(capsys.readouterr().err, "predict")


# ---------------------------------------------------------------------------- the output folder
def test_an_output_folder_that_is_contains_or_lies_inside_the_input_is_refused(tmp_path, bare_model, images, capsys):
    """Issue 16: --output equal to --input replaced the images with masks, exit 0."""
    from upernet_vit.cli import main

    before = {p.name: p.read_bytes() for p in images.iterdir()}
    for output, where in ((images, "is"), (images / "masks", "lies inside"), (tmp_path, "contains")):
        assert main(["predict", "--model", bare_model, "--input", str(images), "--output", str(output)]) == 2
        assert f"{where} the --input" in _one_error_line(capsys.readouterr().err, "predict")
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before and not (images / "masks").exists()
    assert main(["predict", "--model", bare_model, "--input", str(images / "a.png"), "--output", str(images)]) == 2
    assert "contains the --input" in _one_error_line(capsys.readouterr().err, "predict")


def test_predict_never_replaces_a_file_it_did_not_write(tmp_path, bare_model, images, capsys):
    from upernet_vit.cli import main

    truth = tmp_path / "ground_truth"
    truth.mkdir()
    _gray(truth / "a.png", 1)
    assert main(["predict", "--model", bare_model, "--input", str(images), "--output", str(truth)]) == 2
    line = _one_error_line(capsys.readouterr().err, "predict")
    assert "already holds 'a.png' (1 such) that predict did not write" in line
    assert sorted(os.listdir(truth)) == ["a.png"] and np.asarray(Image.open(truth / "a.png")).max() == 1
    # its own outputs it may replace: a second run into the same folder works
    out = tmp_path / "out"
    for _ in range(2):
        assert main(["predict", "--model", bare_model, "--input", str(images), "--output", str(out),
                     "--probabilities"]) == 0
    assert sorted(os.listdir(out)) == [".predict.lock", "a.png", "a_probs.npz", "b.png", "b_probs.npz", "predictions.json"]


def test_the_same_call_again_finishes_a_set_recorded_before_the_precision_spellings(tmp_path, bare_model, images):
    """A predictions.json written before precision.py records amp "none"; the same call now records "float32"
    and is the same prediction set, so it replaces its own files instead of refusing them."""
    import json

    out = tmp_path / "out"
    call = ["predict", "--model", bare_model, "--input", str(images), "--output", str(out)]
    assert main(call) == 0
    record = json.loads((out / "predictions.json").read_text())
    for how in record["files"].values():
        assert how["settings"]["amp"] == "float32"
        how["settings"]["amp"] = "none"  # as an older upernet-vit wrote it
    (out / "predictions.json").write_text(json.dumps(record))
    assert main(call) == 0 and main(call + ["--amp", "fp32"]) == 0  # every spelling of one setting
    assert main(call + ["--amp", "bf16"]) == 2  # another setting is another set


def test_a_large_image_shows_progress_over_its_windows(tmp_path, monkeypatch):
    """Issue 16: a 6000 x 6000 image predicted for 98 s without a sign of progress."""
    import tqdm.auto

    from upernet_vit.inference.predict import predict

    run = tmp_path / "run"
    Trainer(tiny_train_config(train={"num_epochs": 1}), str(run)).run()
    inputs = tmp_path / "in"
    inputs.mkdir()
    _gray(inputs / "big.png", size=(96, 128))
    bars = []

    class Recorder(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})
            self.done = 0
            bars.append((kwargs, self))

        def update(self, n=1):
            self.done += n

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    predict(str(run), str(inputs), str(tmp_path / "out"), device="cpu", step=0.5)
    (kwargs, bar), = [(k, b) for k, b in bars if k.get("unit") == "window"]
    # 32 px patches at step 0.5 over 96 x 128: 5 x 7 windows
    assert kwargs["total"] == 35 and bar.done == 35


# ---------------------------------------------------------------------------- best checkpoints
class _StopAfterEpoch1(Trainer):
    def train_epoch(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt  # as a user's Ctrl-C in epoch 2
        return super().train_epoch(epoch)


class _NaNDice(Trainer):
    def validate(self, write_overlays=False):
        scores = super().validate(write_overlays)
        return {**scores, "dice_mean": float("nan")}


def test_best_of_a_run_without_one_is_an_error_saying_why(tmp_path, capsys):
    """Issue 16: --checkpoint best on a run with no best silently used checkpoint_latest."""
    from upernet_vit.cli import main

    stopped = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        _StopAfterEpoch1(tiny_train_config(train={"num_epochs": 3, "val_every": 5}), str(stopped)).run()
    assert checkpoint_epoch(str(stopped / "checkpoint_latest")) == 1 and not (stopped / "checkpoint_best").exists()
    images = tmp_path / "in"
    images.mkdir()
    _gray(images / "a.png")
    for command in (["predict", "--model", str(stopped), "--input", str(images), "--output", str(tmp_path / "o")],
                    ["export", str(stopped), "--output", str(tmp_path / "m.onnx"), "--no-check"]):
        assert main(command + ["--checkpoint", "best"]) == 2
        line = _one_error_line(capsys.readouterr().err, command[0])
        assert "has no best checkpoint: it stopped at epoch 1 before its first validation (train.val_every 5" in line
        assert "Use --checkpoint latest (epoch 1), or finish the run (train --resume) for final" in line
    # issue 25: the hint for final named best, which this run does not have
    assert main(["predict", "--model", str(stopped), "--input", str(images), "--output", str(tmp_path / "o")]) == 2
    line = _one_error_line(capsys.readouterr().err, "predict")
    assert line.endswith("or pass --checkpoint latest (epoch 1)") and " or best" not in line
    assert not (tmp_path / "o").exists() and not (tmp_path / "m.onnx").exists()

    nan = tmp_path / "nan"
    _NaNDice(tiny_train_config(train={"num_epochs": 2}), str(nan)).run()
    assert not (nan / "checkpoint_best").exists()
    assert main(["predict", "--model", str(nan), "--input", str(images), "--output", str(tmp_path / "o"),
                 "--checkpoint", "best"]) == 2
    line = _one_error_line(capsys.readouterr().err, "predict")
    assert "its mean foreground validation Dice was never a number in 2 validation(s)" in line
    assert "Use --checkpoint latest (epoch 2) or final" in line


class _ImprovesEveryEpoch(Trainer):
    def validate(self, write_overlays=False):
        scores = super().validate(write_overlays)
        return {**scores, "dice_mean": 0.1 * (len(self.history) + 1)}


def test_a_stale_checkpoint_best_given_directly_is_redirected_to_the_best_epoch(tmp_path, monkeypatch, caplog):
    import logging

    from upernet_vit.runs import checkpoints
    from upernet_vit.runs.checkpoints import resolve_model_dir

    real_copy = checkpoints.copy_checkpoint

    def crash_on_the_second_best(source, final):
        if checkpoint_epoch(source) == 2:
            raise SystemExit("killed between checkpoint_latest and checkpoint_best")
        real_copy(source, final)

    monkeypatch.setattr(checkpoints, "copy_checkpoint", crash_on_the_second_best)
    run = tmp_path / "run"
    with pytest.raises(SystemExit):
        _ImprovesEveryEpoch(tiny_train_config(train={"num_epochs": 3}), str(run)).run()
    assert checkpoint_epoch(str(run / "checkpoint_best")) == 1 and checkpoint_epoch(str(run / "checkpoint_latest")) == 2
    with caplog.at_level(logging.WARNING):
        assert resolve_model_dir(str(run / "checkpoint_best")) == str(run / "checkpoint_latest")
    assert "holds epoch 1, not the best epoch 2" in caplog.text
    assert resolve_model_dir(str(run), "best") == str(run / "checkpoint_latest")
    assert resolve_model_dir(str(run / "checkpoint_latest")) == str(run / "checkpoint_latest")


# ---------------------------------------------------------------------------- command line (issue 11)
def test_predict_checks_every_input_before_writing_anything(tmp_path, bare_model, capsys):
    from upernet_vit.cli import main

    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a", "b", "c"):
        _gray(inputs / f"{name}.png")
    _float_tiff(inputs / "z_bad.tif", nan_at=[(1, 1)])  # sorted last: read after the others
    out = tmp_path / "out"
    assert main(["predict", "--model", bare_model, "--input", str(inputs), "--output", str(out), "--device", "cpu"]) == 2
    line = _one_error_line(capsys.readouterr().err, "predict")
    assert "z_bad.tif" in line and "1 non-finite" in line
    assert not out.exists()


def test_predict_output_names_depend_only_on_each_input_name(tmp_path, bare_model):
    from upernet_vit.inference.predict import group_input_files, predict

    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("case1_0000", "case2_0000", "photo_0007"):
        _gray(inputs / f"{name}.png")
    names = sorted(group_input_files(str(inputs), 1))
    assert names == ["case1", "case2", "photo_0007"]
    _gray(inputs / "stray name.png")  # used to turn every output name back into the full stem
    assert sorted(group_input_files(str(inputs), 1)) == sorted(names + ["stray name"])
    written = predict(bare_model, str(inputs), str(tmp_path / "out"), device="cpu")
    assert sorted(os.path.basename(p) for p in written) == ["case1.png", "case2.png", "photo_0007.png", "stray name.png"]

    _gray(inputs / "case1.png")  # case1_0000.png and case1.png would both be case1.png
    with pytest.raises(ValueError, match=r"\['case1.png', 'case1_0000.png'\] would all be written as case1.png"):
        group_input_files(str(inputs), 1)


def test_predict_groups_channel_files_and_checks_their_numbering(tmp_path):
    from upernet_vit.inference.predict import group_input_files

    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("x_0000", "x_0001", "y_0000", "y_0002"):
        _gray(inputs / f"{name}.png")
    with pytest.raises(ValueError, match=r"'y_0000.png', 'y_0002.png'\] of case 'y' must be numbered"):
        group_input_files(str(inputs), 2)
    (inputs / "y_0002.png").rename(inputs / "y_0001.png")
    Image.fromarray(np.zeros((20, 24, 3), dtype=np.uint8)).save(inputs / "rgb.png")  # 3 channels: too many
    with pytest.raises(ValueError, match=r"case 'rgb' \(rgb.png\) has 3 channel\(s\) but the model takes 2"):
        group_input_files(str(inputs), 2)
    (inputs / "rgb.png").unlink()
    assert group_input_files(str(inputs), 2) == {
        "x": [str(inputs / "x_0000.png"), str(inputs / "x_0001.png")],
        "y": [str(inputs / "y_0000.png"), str(inputs / "y_0001.png")],
    }


def test_predict_refuses_a_missing_best_and_checks_sizes_and_channels_first(tmp_path):
    from upernet_vit.inference.predict import group_input_files
    from upernet_vit.runs.checkpoints import resolve_model_dir

    run = tmp_path / "run"
    tiny_model().save_pretrained(run / "checkpoint_latest")
    (run / "checkpoint_best").mkdir()  # no weights in it: no silent fall-back to latest (issue 16)
    with pytest.raises(ValueError, match=r"has no best checkpoint .*use checkpoint='latest'"):
        resolve_model_dir(str(run), "best")

    inputs = tmp_path / "in"
    inputs.mkdir()
    _gray(inputs / "scan_0001.png")
    with pytest.raises(ValueError, match=r"case 'scan' \(scan_0001.png\) has 1 channel\(s\) but the model takes 3"):
        group_input_files(str(inputs), 3)
    (inputs / "scan_0001.png").unlink()
    _gray(inputs / "c_0000.png")
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(inputs / "c_0001.png")
    with pytest.raises(ValueError, match=r"\['c_0000.png', 'c_0001.png'\] of case 'c' differ in size"):
        group_input_files(str(inputs), 2)


def test_train_into_a_path_under_a_file_is_one_line(tmp_path, capsys):
    from upernet_vit.cli import main

    (tmp_path / "file").write_text("x")
    assert main(["train", _config_file(tmp_path), "--output", str(tmp_path / "file" / "run")]) == 2
    line = _one_error_line(capsys.readouterr().err, "train")
    assert "file/run" in line and "is a file, not a folder" in line


def test_debug_prints_the_traceback_and_data_errors_reach_train_log(tmp_path, capsys):
    from upernet_vit.cli import main

    config = _config_file(tmp_path)
    run = tmp_path / "run"
    missing = ["-o", "data.format=folders", "-o", f"data.root={tmp_path / 'nowhere'}"]
    assert main(["train", config, "--output", str(run), *missing]) == 2
    line = _one_error_line(capsys.readouterr().err, "train")
    assert "nowhere" in line and line in (run / "train.log").read_text()
    assert main(["train", config, "--output", str(tmp_path / "run2"), "--debug", *missing]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("upernet-vit train: error:")
