"""No command writes over a file it did not create, and one prediction folder holds one prediction set
(issue 25): a second predict of another model or other inputs is refused or replaces the whole set, two
predicts into one folder are locked out, train never writes among a user's files, evaluate never over
the ground truth, export never over a file it did not write."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from upernet_vit.runs.outputs import FolderLock
from helpers import config_file, gray, one_error_line, record_8bit, tiny_model

pytestmark = pytest.mark.reliability  # what a user's bad input, damaged file or crash leads to


def _model(folder, seed):
    import torch

    torch.manual_seed(seed)
    model = tiny_model(in_chans=1, num_classes=2)
    model.preprocessing = record_8bit(model)
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return _model(root / "A", 0), _model(root / "B", 1)


@pytest.fixture
def images(tmp_path):
    for name, n in (("three", 3), ("one", 1)):
        (tmp_path / name).mkdir()
        for i in range(n):
            gray(tmp_path / name / f"{name}{i}.png", value=40 * i + 10)
    return tmp_path / "three", tmp_path / "one"


def _predict(*args):
    from upernet_vit.cli import main

    return main(["predict", *map(str, args)])


# ---------------------------------------------------------------------------- one folder, one prediction set
def test_a_second_predict_of_another_model_into_the_folder_is_refused_or_replaces_the_whole_set(
        tmp_path, models, images, capsys):
    """Issue 25, bad case 3: A's 3 masks and B's 1 mask ended in one folder, the record naming B for all."""
    (a, b), (three, one) = models, images
    out = tmp_path / "P"
    assert _predict("--model", a, "--input", three, "--output", out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert _predict("--model", b, "--input", one, "--output", out) == 2
    line = one_error_line(capsys.readouterr().err, "predict")
    assert "already holds another prediction set: 3 file(s)" in line and "pass --overwrite" in line and a in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / "notes.txt").write_text("mine")  # a user's file: --overwrite replaces only the recorded set
    assert _predict("--model", b, "--input", one, "--output", out, "--overwrite") == 0
    assert sorted(os.listdir(out)) == [".predict.lock", "notes.txt", "one0.png", "predictions.json"]
    record = json.loads((out / "predictions.json").read_text())
    assert record["complete"] and list(record["files"]) == ["one0.png"]
    made = record["files"]["one0.png"]
    assert [m["folder"] for m in made["models"]] == [os.path.abspath(b)] and made["checkpoint"] == "final"
    assert len(made["models"][0]["weights_sha256"]) == 64 and made["inputs"] == [str(one / "one0.png")]
    assert made["settings"]["step"] == 0.5 and made["settings"]["mirror"] is False


def test_other_inputs_or_settings_are_another_set_and_the_same_call_again_is_not(tmp_path, models, images, capsys):
    (a, _), (three, one) = models, images
    out = tmp_path / "P"
    assert _predict("--model", a, "--input", three, "--output", out) == 0
    assert _predict("--model", a, "--input", three, "--output", out) == 0  # a rerun (e.g. after a crash)
    assert _predict("--model", a, "--input", one, "--output", out) == 2
    assert "another prediction set" in one_error_line(capsys.readouterr().err, "predict")
    assert _predict("--model", a, "--input", three, "--output", out, "--mirror") == 2
    assert "another prediction set" in one_error_line(capsys.readouterr().err, "predict")


def test_an_older_record_and_an_evaluate_summary_of_the_replaced_set(tmp_path, models, images):
    """A record written before issue 25 (a list of names) still marks its files as predict's; --overwrite
    also removes the summary evaluate wrote about the replaced set."""
    (a, _), (three, _) = models, images
    out = tmp_path / "P"
    out.mkdir()
    (out / "three0.png").write_bytes(b"old mask")
    (out / "predictions.json").write_text(json.dumps({"written_by": "upernet-vit predict", "files": ["three0.png"]}))
    (out / "summary.json").write_text(json.dumps({"labels": {}, "dice": {}, "iou": {}, "per_case": {},
                                                  "mean_case_dice": {}}))
    assert _predict("--model", a, "--input", three, "--output", out) == 2
    assert _predict("--model", a, "--input", three, "--output", out, "--overwrite") == 0
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == [
        "predictions.json", "three0.png", "three1.png", "three2.png"]


def test_a_record_predict_did_not_write_is_neither_replaced_nor_obeyed(tmp_path, models, images, capsys):
    """A user's predictions.json (another tool's) listing their files must not make --overwrite delete them."""
    (a, _), (three, _) = models, images
    out = tmp_path / "P"
    out.mkdir()
    (out / "precious.png").write_bytes(b"mine")
    (out / "predictions.json").write_text(json.dumps({"files": ["precious.png", "../outside.txt"]}))
    assert _predict("--model", a, "--input", three, "--output", out, "--overwrite") == 2
    assert "holds a predictions.json that predict did not write" in one_error_line(capsys.readouterr().err, "predict")
    assert sorted(os.listdir(out)) == ["precious.png", "predictions.json"]
    (tmp_path / "outside.txt").write_text("mine too")  # a crafted record of predict's own cannot reach it
    (out / "predictions.json").write_text(json.dumps({"written_by": "upernet-vit predict", "files": ["../outside.txt"]}))
    assert _predict("--model", a, "--input", three, "--output", out, "--overwrite") == 0
    assert (tmp_path / "outside.txt").read_text() == "mine too" and (out / "precious.png").read_bytes() == b"mine"


def test_two_predicts_into_one_folder_are_locked_out_and_a_killed_ones_lock_is_stale(tmp_path, models, images, capsys):
    (a, _), (three, _) = models, images
    out = tmp_path / "P"
    out.mkdir()
    with FolderLock(str(out), ".predict.lock", "predict"):  # another predict is writing the folder
        assert _predict("--model", a, "--input", three, "--output", out) == 2
    line = one_error_line(capsys.readouterr().err, "predict")
    assert "is in use by another predict (pid " in line and not (out / "three0.png").exists()
    (out / ".predict.lock").write_text("pid 999999\n")  # left by a killed process: nobody holds it
    assert _predict("--model", a, "--input", three, "--output", out) == 0
    assert (out / "three2.png").is_file()


# ---------------------------------------------------------------------------- train --output
def test_train_never_writes_among_a_users_files(tmp_path, capsys, monkeypatch):
    """Issue 25, bad case 4: train --output . replaced the user's config.yaml with the resolved config."""
    from upernet_vit.cli import main

    work = tmp_path / "work"
    work.mkdir()
    mine = config_file(tmp_path, num_epochs=1)
    (work / "config.yaml").write_text("# my own notes\n")
    monkeypatch.chdir(work)
    assert main(["train", mine, "--output", "."]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert "--output '.' holds files that no training run wrote there (e.g. 'config.yaml'" in line
    assert sorted(os.listdir(work)) == ["config.yaml"] and (work / "config.yaml").read_text() == "# my own notes\n"
    assert main(["train", mine, "--output", "run"]) == 0  # a new folder: its own run
    assert (work / "run" / ".upernet-vit-run").is_file()
    assert main(["train", mine, "--output", "run", "--resume", "-o", "train.num_epochs=2"]) == 2  # config differs
    assert "--resume: the config differs" in one_error_line(capsys.readouterr().err, "train")


def test_a_run_folder_from_before_the_marker_is_still_a_run(tmp_path):
    from upernet_vit.runs.run_folder import RUN_MARKER, claim_run_folder

    old = tmp_path / "old"
    (old / "checkpoint_latest").mkdir(parents=True)
    for name in (".lock", "config.yaml", "train.log", "metrics.csv"):
        (old / name).write_text("")
    claim_run_folder(str(old))
    assert (old / RUN_MARKER).is_file()
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        claim_run_folder(str(tmp_path / "file"))
    user = tmp_path / "user"
    user.mkdir()
    (user / "config.yaml").write_text("")  # config.yaml alone is not a run: no .lock
    with pytest.raises(FileExistsError, match=r"holds files that no training run wrote there \(e.g. 'config.yaml'"):
        claim_run_folder(str(user))


# ---------------------------------------------------------------------------- evaluate --output
def test_evaluate_never_writes_over_the_ground_truth_or_a_file_it_did_not_write(tmp_path, capsys):
    """Issue 25, bad case 6: --output gt/case_048.png turned the ground-truth PNG into JSON text, exit 0."""
    from upernet_vit.cli import main

    for folder in ("gt", "pred"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.eye(8, dtype=np.uint8)).save(tmp_path / folder / "case_048.png")
    truth = (tmp_path / "gt" / "case_048.png").read_bytes()
    args = ["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--output"]
    assert main(args + [str(tmp_path / "gt" / "case_048.png")]) == 2
    assert "case_048.png' lies inside the --gt" in one_error_line(capsys.readouterr().err, "evaluate")
    assert main(args + [str(tmp_path / "gt" / "new.json")]) == 2
    assert "lies inside the --gt" in one_error_line(capsys.readouterr().err, "evaluate")
    assert main(args + [str(tmp_path / "pred" / "case_048.png")]) == 2
    assert "is the prediction 'case_048'" in one_error_line(capsys.readouterr().err, "evaluate")
    (tmp_path / "notes.json").write_text("{}")
    assert main(args + [str(tmp_path / "notes.json")]) == 2
    assert "is a file that evaluate did not write" in one_error_line(capsys.readouterr().err, "evaluate")
    assert (tmp_path / "gt" / "case_048.png").read_bytes() == truth and (tmp_path / "notes.json").read_text() == "{}"
    assert not (tmp_path / "gt" / "new.json").exists()
    for _ in range(2):  # its own summary it may replace
        assert main(args + [str(tmp_path / "summary.json")]) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["written_by"] == "upernet-vit evaluate"


def test_evaluate_warns_of_predictions_in_another_label_set_and_of_files_it_leaves_out(tmp_path, caplog):
    """Issue 25, weak: 0/255 predictions against 0/1 truth gave foreground Dice 0.0 without a word, and an
    extra prediction file was ignored silently."""
    import logging

    from upernet_vit.inference.evaluate import evaluate

    for folder in ("gt", "pred"):
        (tmp_path / folder).mkdir()
    Image.fromarray(np.eye(8, dtype=np.uint8)).save(tmp_path / "gt" / "c.png")
    Image.fromarray(np.eye(8, dtype=np.uint8) * 255).save(tmp_path / "pred" / "c.png")
    Image.fromarray(np.eye(8, dtype=np.uint8)).save(tmp_path / "pred" / "stray.png")
    with caplog.at_level(logging.WARNING):
        evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"))
    assert "the predictions hold values [255] that no ground-truth file" in caplog.text and "pass labels=" in caplog.text
    assert "pred_dir " in caplog.text and "holds 1 prediction(s) without ground truth" in caplog.text
    assert "stray.png" in caplog.text and "--" not in caplog.text


# ---------------------------------------------------------------------------- export --output
def test_export_never_writes_over_a_file_it_did_not_write(tmp_path, models, capsys):
    from upernet_vit.cli import main
    from upernet_vit.export.onnx import check_export_path

    a, _ = models
    weights = os.path.join(a, "model.safetensors")
    before = open(weights, "rb").read()
    assert main(["export", a, "--output", weights]) == 2
    assert "model.safetensors' lies inside the model folder" in one_error_line(capsys.readouterr().err, "export")
    (tmp_path / "mine.onnx").write_bytes(b"not ours")
    assert main(["export", a, "--output", str(tmp_path / "mine.onnx")]) == 2
    assert "is a file that export did not write" in one_error_line(capsys.readouterr().err, "export")
    assert open(weights, "rb").read() == before and (tmp_path / "mine.onnx").read_bytes() == b"not ours"
    (tmp_path / "new.onnx.data").write_bytes(b"someone's")
    with pytest.raises(FileExistsError, match=r"new.onnx.data' is a file that export did not write"):
        check_export_path(str(tmp_path / "new.onnx"))


def test_make_demo_never_writes_among_a_users_files_and_predict_not_into_its_model(tmp_path, models, images, capsys):
    from upernet_vit.cli import main

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "dataset.json").write_text('{"mine": 1}')
    assert main(["make-demo", str(tmp_path / "mine"), "--num-train", "2", "--num-test", "1", "--size", "16"]) == 2
    assert "is not a demo dataset that make-demo wrote" in one_error_line(capsys.readouterr().err, "make-demo")
    assert os.listdir(tmp_path / "mine") == ["dataset.json"]
    for _ in range(2):  # its own dataset it may write again
        assert main(["make-demo", str(tmp_path / "demo"), "--num-train", "2", "--num-test", "1", "--size", "16"]) == 0
    (a, _), (three, _) = models, images
    assert _predict("--model", a, "--input", three, "--output", os.path.join(a, "pred")) == 2
    assert "lies inside the --model" in one_error_line(capsys.readouterr().err, "predict")
    assert not os.path.exists(os.path.join(a, "pred"))
    assert _predict("--model", a, "--input", three, "--output", tmp_path / "o", "--intensity-scale", "255") == 2
    assert "--intensity-scale 255 is for a model folder without preprocessing.json" in one_error_line(
        capsys.readouterr().err, "predict")


def test_train_never_writes_into_its_dataset(tmp_path, capsys):
    from upernet_vit.cli import main

    data = tmp_path / "Dataset001_Demo"
    assert main(["make-demo", str(data), "--num-train", "6", "--num-test", "1", "--size", "32"]) == 0
    assert main(["train", config_file(tmp_path), "--data", str(data), "--output", str(data / "run")]) == 2
    assert "lies inside the data.root" in one_error_line(capsys.readouterr().err, "train")
    assert not (data / "run").exists()
