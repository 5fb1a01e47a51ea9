"""Errors name what the caller used: a Python caller reads its own parameters (``step``, ``scales``,
``output_dir``), a user of the command line its flags (``--step``, ``--scales``, ``--output``); cli.py maps
the one to the other (``cli.FLAGS``, ``cli._with_flags``)."""
import ast
import logging
import os
import pathlib
import re

import pytest

import upernet_vit
from helpers import config_file, gray, one_error_line, saved_8bit_model, tiny_model

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")  # a command-line flag, not "x--y" nor a "---" rule


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A model folder with its preprocessing record (8-bit inputs, one channel)."""
    return saved_8bit_model(tmp_path_factory.mktemp("models") / "m")


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a", "b"):
        gray(folder / f"{name}.png", value=60)
    return str(folder)


def _no_flag(message: str) -> str:
    assert not FLAG.search(message), message
    return message


# ---------------------------------------------------------------------------- the Python API: parameter names
@pytest.mark.parametrize("step", [2.0, 0.0, float("nan")])
def test_predict_names_its_step_parameter(tmp_path, model, images, step):
    from upernet_vit.inference.predict import predict

    with pytest.raises(ValueError) as info:
        predict(model, images, str(tmp_path / "out"), device="cpu", step=step)
    assert _no_flag(str(info.value)).startswith(f"step={step}: the sliding-window step is a fraction of the patch")
    assert not (tmp_path / "out").exists()


def test_predict_names_its_scales_parameter(tmp_path, model, images):
    from upernet_vit.inference.predict import predict

    with pytest.raises(ValueError) as info:
        predict(model, images, str(tmp_path / "out"), device="cpu", scales=[1.0, 10.0])
    assert _no_flag(str(info.value)).startswith("scales=[1, 10]: give one or more factors in [0.25, 4], "
                                                "e.g. scales=[0.75, 1, 1.25]")


def test_predict_names_output_dir_and_input_path_when_one_holds_the_other(model, images):
    from upernet_vit.inference.predict import predict

    inside = os.path.join(images, "masks")
    with pytest.raises(ValueError) as info:
        predict(model, images, inside, device="cpu")
    assert _no_flag(str(info.value)).startswith(f"output_dir {inside!r} lies inside the input_path {images!r}")
    assert not os.path.exists(inside)


def test_predict_names_checkpoint_device_and_overwrite(tmp_path, model, images, caplog):
    from upernet_vit.inference.predict import predict

    run = tmp_path / "run"  # a run folder: checkpoint picks one of its checkpoints
    tiny_model(in_chans=1, num_classes=2).save_pretrained(run / "checkpoint_latest")
    with pytest.raises(ValueError) as info:
        predict(str(run), images, str(tmp_path / "out"), device="cpu", checkpoint="newest")
    assert _no_flag(str(info.value)) == "checkpoint='newest': use one of 'final', 'best', 'latest'"
    with pytest.raises(ValueError) as info:
        predict(model, images, str(tmp_path / "out"), device="gpu")
    assert _no_flag(str(info.value)).startswith("device 'gpu' is not a device")

    out = str(tmp_path / "out")
    predict(model, images, out, device="cpu")
    with pytest.raises(FileExistsError) as info:
        predict(model, images, out, device="cpu", mirror=True)  # another prediction set into the same folder
    assert _no_flag(str(info.value)).startswith(f"output_dir {out!r} already holds another prediction set")
    assert "pass overwrite=True to replace that whole set" in str(info.value)
    with caplog.at_level(logging.INFO, logger="upernet_vit"):
        predict(model, images, out, device="cpu", mirror=True, overwrite=True)
    assert "overwrite=True: removed the 2 file(s) of the earlier prediction set" in caplog.text
    assert "(x4 with mirror=True)" in caplog.text and not FLAG.search(caplog.text)


def test_evaluate_names_pred_dir_gt_dir_and_the_summary_path(tmp_path):
    from upernet_vit.inference.evaluate import check_summary_path, evaluate

    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    with pytest.raises(ValueError) as info:
        evaluate(str(pred), str(gt))
    assert _no_flag(str(info.value)) == f"no label files in gt_dir {str(gt)!r}"
    gray(gt / "c.png", value=1)
    with pytest.raises(FileNotFoundError) as info:
        evaluate(str(pred), str(gt))
    assert _no_flag(str(info.value)).startswith(f"pred_dir {str(pred)!r} has no prediction for 1 case(s)")
    summary = str(gt / "summary.json")
    with pytest.raises(ValueError) as info:
        check_summary_path(summary, str(pred), str(gt))
    assert _no_flag(str(info.value)).startswith(f"path {summary!r} lies inside the gt_dir {str(gt)!r}")


def test_training_names_output_dir_and_resume(tmp_path):
    from upernet_vit.runs.run_folder import claim_run_folder

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError) as info:
        claim_run_folder(str(tmp_path))
    assert _no_flag(str(info.value)).startswith(f"output_dir {str(tmp_path)!r} holds files that no training run")


# ---------------------------------------------------------------------------- the command line: flags
def _main(*args) -> int:
    from upernet_vit.cli import main

    return main([str(a) for a in args])


@pytest.mark.parametrize("flag,value,shown", [
    ("--step", "2", "--step 2.0: the sliding-window step is a fraction of the patch"),
    ("--scales", "1 10", "--scales 1 10: give one or more factors in [0.25, 4], e.g. --scales 0.75 1 1.25"),
    ("--device", "gpu", "--device 'gpu' is not a device"),
])
def test_the_command_line_names_the_flags(tmp_path, model, images, capsys, flag, value, shown):
    assert _main("predict", "--model", model, "--input", images, "--output", tmp_path / "out", flag,
                 *value.split()) == 2
    line = one_error_line(capsys.readouterr().err, "predict")
    assert shown in line and "step=" not in line and "scales=" not in line


def test_the_command_line_names_output_and_input_even_in_folders_called_like_the_parameters(
        tmp_path, model, capsys):
    images = tmp_path / "input_path"  # a folder named like a parameter stays as the user wrote it
    images.mkdir()
    gray(images / "a.png")
    inside = images / "output_dir"
    assert _main("predict", "--model", model, "--input", images, "--output", inside) == 2
    line = one_error_line(capsys.readouterr().err, "predict")
    assert f"error: --output {str(inside)!r} lies inside the --input {str(images)!r}" in line


def test_the_command_line_names_overwrite_in_its_refusal_and_its_log(tmp_path, model, images, capsys):
    out = tmp_path / "out"
    assert _main("predict", "--model", model, "--input", images, "--output", out) == 0
    assert _main("predict", "--model", model, "--input", images, "--output", out, "--mirror") == 2
    line = one_error_line(capsys.readouterr().err, "predict")
    assert f"error: --output {str(out)!r} already holds another prediction set" in line
    assert "pass --overwrite to replace that whole set" in line
    assert _main("predict", "--model", model, "--input", images, "--output", out, "--mirror", "--overwrite") == 0
    err = capsys.readouterr().err
    assert "--overwrite: removed the 2 file(s)" in err and "(x4 with --mirror)" in err and "=True" not in err


def test_the_command_line_names_evaluate_and_train_flags(tmp_path, capsys):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    assert _main("evaluate", "--pred", pred, "--gt", gt) == 2
    assert f"error: no label files in --gt {str(gt)!r}" in one_error_line(capsys.readouterr().err, "evaluate")
    gray(gt / "c.png", value=1)
    assert _main("evaluate", "--pred", pred, "--gt", gt, "--output", gt / "s.json") == 2
    line = one_error_line(capsys.readouterr().err, "evaluate")
    assert f"error: --output {str(gt / 's.json')!r} lies inside the --gt {str(gt)!r}" in line
    assert _main("evaluate", "--pred", pred, "--gt", gt) == 2
    assert f"error: --pred {str(pred)!r} has no prediction" in one_error_line(capsys.readouterr().err, "evaluate")

    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    assert _main("train", config_file(tmp_path), "--output", work) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert f"error: --output {str(work)!r} holds files that no training run wrote" in line


def test_with_flags_maps_parameters_only_where_they_cannot_be_words():
    from upernet_vit.cli import FLAGS, _with_flags

    predict = FLAGS["predict"]
    cases = {
        "step=0.05: too small": "--step 0.05: too small",
        "the sliding-window step is a fraction": "the sliding-window step is a fraction",  # the word, not the flag
        "pass overwrite=True to replace; choose another output_dir.": "pass --overwrite to replace; choose another --output.",
        "use checkpoint='latest' or checkpoint='best'": "use --checkpoint latest or --checkpoint best",
        "scales=[0.5, 1, 2]: x": "--scales 0.5 1 2: x",
        "device is 'cuda' but this machine has no CUDA device": "--device is 'cuda' but this machine has no CUDA device",
        "output_dir '/data/output_dir/x.output_dir' and 'input_path'": "--output '/data/output_dir/x.output_dir' and 'input_path'",
        "model.check_output_dir(step)": "model.check_output_dir(step)",
        "output_dir '/data/my output_dir' is a file": "--output '/data/my output_dir' is a file",  # quoted: a path
        "the model's output_dir 'a b' holds input_path": "the model's --output 'a b' holds --input",  # an apostrophe
    }
    for library, command_line in cases.items():
        assert _with_flags(library, predict) == command_line
    assert _with_flags("step=2", {}) == "step=2"


# ---------------------------------------------------------------------------- nothing outside cli.py names a flag
# string literals that may name a command-line flag, with why
ALLOWED = {
    # nnU-Net instantiates this trainer from its own command line, where no Python caller of ours exists: the
    # message tells the user which command to run
    ("integrations/nnunet/trainer.py", "upernet-vit nnunet-train DATASET 2d FOLD --config C"),
}


def _docstrings(tree: ast.AST) -> set:
    """The ids of the docstring constants of ``tree`` (they may describe the command line)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                found.add(id(first.value))
    return found


def test_no_string_outside_cli_names_a_flag():
    """Every string the library code raises, logs or passes on (e.g. as ``refuse_overlap``'s names), not only
    the messages that the grep of the issue found: a flag belongs to cli.py."""
    root = pathlib.Path(upernet_vit.__file__).parent
    found, allowed_seen = [], set()
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative == "cli.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                allowed = {text for file, text in ALLOWED if file == relative and text in node.value}
                allowed_seen |= {(relative, text) for text in allowed}
                rest = node.value
                for text in allowed:
                    rest = rest.replace(text, "")
                if FLAG.search(rest):
                    found.append(f"{relative}:{node.lineno}: {node.value[:80]!r}")
    assert not found, "\n".join(found)
    assert allowed_seen == ALLOWED  # an allowance that no longer matches anything goes
