"""Model and run files (issue 16): errors that blame the right file, records that survive a re-save, and a
metrics.csv that never runs ahead of the checkpoints."""
import csv
import errno
import os
import subprocess
import sys
import textwrap

import pytest

from upernet_vit import UperNetViT
from upernet_vit.runs.checkpoints import checkpoint_epoch
from upernet_vit.training.trainer import Trainer
from helpers import tiny_model, tiny_train_config

pytestmark = pytest.mark.reliability  # what a user's bad input, damaged file or crash leads to


@pytest.mark.parametrize("content,shown", [(b"", "nothing"), (b"\x00\xff garbage", r"b'\x00\xff'"),
                                           (b"abc123  model.safetensors\n", "b'abc123'")])
def test_a_damaged_checksum_file_is_blamed_not_the_weights(tmp_path, content, shown):
    folder = tmp_path / "m"
    tiny_model().save_pretrained(folder)
    (folder / "SHA256SUMS").write_bytes(content)
    with pytest.raises(ValueError) as info:
        UperNetViT.from_pretrained(folder)
    message = str(info.value)
    assert message.startswith(f"{folder / 'SHA256SUMS'} is damaged: it should hold the sha256")
    assert f"holds {shown}" in message and "delete SHA256SUMS to load model.safetensors unchecked" in message


def test_a_full_disk_while_copying_the_best_names_the_folder_being_written(tmp_path, monkeypatch):
    """shutil.copyfile names the source first: the error used to blame checkpoint_latest."""
    from upernet_vit.cli import describe_error
    from upernet_vit.runs.checkpoints import copy_checkpoint

    source = tmp_path / "checkpoint_latest"
    tiny_model().save_pretrained(source)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "sendfile", full)  # the real shutil code path around it
    with pytest.raises(OSError) as info:
        copy_checkpoint(str(source), str(tmp_path / "checkpoint_best"))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "checkpoint_best")
    assert describe_error(info.value).startswith(f"'{tmp_path / 'checkpoint_best'}': no space left on the device")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_latest"]  # the partial copy is removed


def test_save_pretrained_of_a_trained_model_keeps_its_preprocessing_record(tmp_path):
    """README's merge-LoRA flow (from_pretrained, merge_lora, save_pretrained) dropped preprocessing.json."""
    run = tmp_path / "run"
    Trainer(tiny_train_config(train={"num_epochs": 1}, lora={"enabled": True, "r": 2}), str(run)).run()
    model = UperNetViT.from_pretrained(run / "checkpoint_latest")
    assert model.preprocessing["intensity_scale"] == 255.0
    model.merge_lora()
    model.save_pretrained(tmp_path / "merged")
    original = (run / "checkpoint_latest" / "preprocessing.json").read_text()
    assert (tmp_path / "merged" / "preprocessing.json").read_text() == original
    assert tiny_model().preprocessing is None
    tiny_model().save_pretrained(tmp_path / "bare")
    assert not (tmp_path / "bare" / "preprocessing.json").exists()


def _rows(run):
    with open(run / "metrics.csv") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def test_metrics_csv_never_runs_ahead_of_the_checkpoint_and_resume_mends_it(tmp_path, monkeypatch):
    """A kill between the metrics row and the checkpoint left metrics.csv a row ahead until resume."""
    from upernet_vit.runs import checkpoints
    from upernet_vit.runs.run_folder import RunFolder

    config = tiny_train_config(train={"num_epochs": 3})
    write_folder, write_metrics = checkpoints.write_folder_atomically, RunFolder.write_metrics

    def killed_in_checkpoint_2(final, write):  # a kill while epoch 2's checkpoint is written
        if final.endswith("checkpoint_latest") and checkpoint_epoch(final) == 1:
            raise SystemExit("killed")
        write_folder(final, write)

    def killed_after_checkpoint_2(self, history):  # a kill after epoch 2's checkpoint, before its row
        if len(history) == 2:
            raise SystemExit("killed")
        write_metrics(self, history)

    before = tmp_path / "before"
    with monkeypatch.context() as patch, pytest.raises(SystemExit):
        patch.setattr(checkpoints, "write_folder_atomically", killed_in_checkpoint_2)
        Trainer(config, str(before)).run()
    assert _rows(before) == [1] and checkpoint_epoch(str(before / "checkpoint_latest")) == 1

    after = tmp_path / "after"
    with monkeypatch.context() as patch, pytest.raises(SystemExit):
        patch.setattr(RunFolder, "write_metrics", killed_after_checkpoint_2)
        Trainer(config, str(after)).run()
    assert _rows(after) == [1] and checkpoint_epoch(str(after / "checkpoint_latest")) == 2
    trainer = Trainer(config, str(after), resume=True)  # the csv is rewritten from the checkpoint's history
    assert _rows(after) == [1, 2]
    trainer.run()
    assert _rows(after) == [1, 2, 3]


def test_lora_without_peft_names_the_package_to_install(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["peft"] = None  # as if peft were not installed
        from upernet_vit.cli import main
        sys.exit(main(["train", {str(tmp_path / 'c.yaml')!r}, "--output", {str(tmp_path / 'run')!r}]))
    """)
    import yaml

    from helpers import TINY_CONFIG

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(dict(TINY_CONFIG, lora={"enabled": True})))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[-1].startswith("upernet-vit train: error: ModuleNotFoundError: LoRA (lora.enabled / enable_lora) "
                                "needs the peft package") and "pip install 'peft>=0.11'" in lines[-1]
