"""The command line as a program around the library (issue 26, part): its version, a help text for every
option, and logging that leaves the caller's own set-up alone."""
import argparse
import logging

import pytest

import upernet_vit
from upernet_vit.cli import build_parser, main


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"upernet-vit {upernet_vit.__version__}"


def test_every_option_of_every_command_has_a_help_text():
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [f"{name} {action.dest}" for name, sub in commands.choices.items() for action in sub._actions
               if not isinstance(action, argparse._HelpAction) and not action.help]
    assert not missing, missing


def test_the_command_line_leaves_the_callers_logging_alone(tmp_path, capsys):
    """It used to call logging.basicConfig(force=True), replacing the root logger's handlers."""
    root = logging.getLogger()
    mine = logging.StreamHandler()
    root.addHandler(mine)
    try:
        before = list(root.handlers), root.level
        assert main(["make-demo", str(tmp_path / "d"), "--num-train", "2", "--num-test", "1", "--size", "16"]) == 0
        assert main(["predict", "--model", str(tmp_path / "none"), "--input", str(tmp_path / "d"),
                     "--output", str(tmp_path / "o")]) == 2  # a command that sets up logging, and fails
        assert (list(root.handlers), root.level) == before
        logging.getLogger("upernet_vit.somewhere").info("a record of the package")
        assert "a record of the package" in capsys.readouterr().err  # the CLI's handler shows the package's INFO
    finally:
        root.removeHandler(mine)


def test_a_config_error_names_yaml_keys_not_flags(tmp_path, capsys):
    """The unknown-key error lists the keys of its section; train.output_dir is one (the CLI used to show it as
    --output, which is no key)."""
    assert main(["train", "demo", "--output", str(tmp_path / "run"), "-o", "train.num_epoch=1"]) == 2
    err = capsys.readouterr().err
    assert "train.num_epoch: unknown key; did you mean 'train.num_epochs'?" in err
    assert "output_dir" in err and "--output" not in err
    assert not (tmp_path / "run").exists()


def test_a_log_line_does_not_land_on_a_progress_bars_line():
    """The data cache's bar was still on the line when the notice that data.labels is not set was logged,
    so the notice was written after it, easy to miss."""
    import io

    from tqdm import tqdm

    from upernet_vit.cli import _ProgressAwareHandler

    stream = io.StringIO()
    handler = _ProgressAwareHandler(stream)
    bar = tqdm(total=3, desc="data cache", file=stream, disable=False)
    bar.update(1)
    handler.emit(logging.makeLogRecord({"msg": "data.labels is not set", "levelno": logging.INFO}))
    bar.close()
    lines = stream.getvalue().replace("\r", "\n").split("\n")
    assert "data.labels is not set" in lines  # a line of its own
    assert any(line.startswith("data cache:") for line in lines)  # the bar was drawn (and again after)


def test_data_reads_a_folder_with_dataset_json_as_nnunet_and_one_without_as_images_and_masks(tmp_path, capsys):
    """--data picks the layout: both folders here are empty, so the error says which layout was read."""
    plain, nnunet = tmp_path / "plain", tmp_path / "Dataset001_X"
    plain.mkdir(), nnunet.mkdir()
    (nnunet / "dataset.json").write_text("{}")
    assert main(["train", "demo", "--data", str(plain), "--output", str(tmp_path / "r1")]) == 2
    assert f"folder '{plain / 'images'}' does not exist" in capsys.readouterr().err
    assert main(["train", "demo", "--data", str(nnunet), "--output", str(tmp_path / "r2")]) == 2
    assert "dataset.json has no 'channel_names' key" in capsys.readouterr().err
