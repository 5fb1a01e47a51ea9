"""Model files (issue 11): a checksum that catches a flipped bit, truncated or mismatched weights, files that
are not checkpoints named as such, no non-finite weights written, and resume after an architecture change."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from upernet_vit import UperNetViT
from upernet_vit.backbones.checkpoint import read_checkpoint
from upernet_vit.training.trainer import Trainer
from helpers import tiny_model, tiny_train_config

pytestmark = pytest.mark.reliability  # what a user's bad input, damaged file or crash leads to


def test_the_weights_checksum_is_recorded_and_verified(tmp_path):
    model = tiny_model()
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    digest, name = (folder / "SHA256SUMS").read_text().splitlines()[0].split()
    assert name == "model.safetensors" and len(digest) == 64
    UperNetViT.from_pretrained(folder)

    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-100] ^= 0x01  # one flipped bit in a weight: safetensors itself loads it without complaint
    (folder / "model.safetensors").write_bytes(bytes(data))
    assert load_file(folder / "model.safetensors").keys() == model.state_dict().keys()
    with pytest.raises(ValueError, match=r"model.safetensors is damaged or was changed.*sha256"):
        UperNetViT.from_pretrained(folder)
    (folder / "SHA256SUMS").unlink()  # as written before checksums existed: loads
    UperNetViT.from_pretrained(folder)


def test_a_truncated_weights_file_or_a_mismatched_config_names_the_files(tmp_path):
    folder = tmp_path / "m"
    tiny_model().save_pretrained(folder)
    (folder / "SHA256SUMS").unlink()
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read .*model.safetensors.*damaged or truncated"):
        UperNetViT.from_pretrained(folder)

    tiny_model().save_pretrained(folder)
    (folder / "SHA256SUMS").unlink()  # an older folder: the edit is not caught by a digest, but by the shapes
    config = (folder / "config.yaml").read_text()
    (folder / "config.yaml").write_text(config.replace("hidden_size: 32", "hidden_size: 48"))
    with pytest.raises(ValueError, match=r"model.safetensors does not match .*config.yaml: size mismatch"):
        UperNetViT.from_pretrained(folder)


def test_checkpoint_files_that_are_not_checkpoints_are_named_as_such(tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pth").write_text("<html>403 Forbidden</html>")
    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save({"model": {"w": torch.ones(3)}, "args": _Custom()}, tmp_path / "pickled.pth")
    assert torch.equal(read_checkpoint(str(tmp_path / "ok.pt"))["w"], torch.ones(3))
    cases = {
        "half.pt": r"half.pt' is a damaged or truncated torch checkpoint",
        "text.pth": r"text.pth' is not a PyTorch or safetensors checkpoint \(it starts with b'<html>",
        "empty.pth": r"empty.pth' is an empty file",
    }
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message) as info:
            read_checkpoint(str(tmp_path / name))
        assert "trust_checkpoint" not in str(info.value)  # that advice cannot help here
    with pytest.raises(ValueError, match=r"stores Python objects.*_Custom.*trust_checkpoint=True"):
        read_checkpoint(str(tmp_path / "pickled.pth"))
    assert torch.equal(read_checkpoint(str(tmp_path / "pickled.pth"), trust_checkpoint=True)["model"]["w"], torch.ones(3))


class _Custom:
    pass


def test_a_zip_that_is_not_a_checkpoint_and_fp16_overflow(tmp_path):
    np.savez(tmp_path / "arrays.npz", a=np.ones(3))
    with pytest.raises(ValueError, match=r"arrays.npz' is a zip archive but not a PyTorch checkpoint"):
        read_checkpoint(str(tmp_path / "arrays.npz"))
    model = tiny_model().half()
    with pytest.raises(ValueError, match=r"overflow the model's dtype torch.float16"):
        model(torch.full((1, 3, 32, 32), 1e6))


def test_save_pretrained_refuses_non_finite_weights(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.head.classifier.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinity.*head.classifier.weight"):
        model.save_pretrained(tmp_path / "m")
    assert not os.path.exists(tmp_path / "m" / "model.safetensors")


def test_resume_after_an_architecture_change_names_the_key(tmp_path):
    run = str(tmp_path / "run")
    Trainer(tiny_train_config(train={"num_epochs": 1}), run).run()
    changed = tiny_train_config(train={"num_epochs": 1}, model={"decoder": {"hidden_size": 24}})
    with pytest.raises(ValueError, match=r"config differs .*model.decoder.hidden_size \(16 -> 24\)"):
        Trainer(changed, run, resume=True)


def test_train_refuses_a_folder_that_holds_a_run_and_resumes_it_from_its_own_config(tmp_path, capsys):
    """A second ``train`` into a run folder would restart over its checkpoints: refused, naming --resume;
    ``train RUN/config.yaml --output RUN --resume`` continues it with the config it was started with."""
    import yaml

    from upernet_vit.cli import main
    from helpers import TINY_CONFIG

    config = json.loads(json.dumps(TINY_CONFIG))
    config["train"]["num_epochs"] = 1
    path, run = tmp_path / "tiny.yaml", tmp_path / "run"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path), "--output", str(run)]) == 0
    capsys.readouterr()
    assert main(["train", str(path), "--output", str(run)]) == 2
    line = capsys.readouterr().err
    assert "already holds a run (checkpoint_latest); pass --resume to continue it" in line
    assert main(["train", str(run / "config.yaml"), "--output", str(run), "--resume",
                 "-o", "train.num_epochs=2"]) == 2  # another config: refused, naming the key
    assert "the config differs from the run" in capsys.readouterr().err
    before = (run / "checkpoint_latest" / "model.safetensors").read_bytes()
    assert main(["train", str(run / "config.yaml"), "--output", str(run), "--resume"]) == 0  # finished: nothing to do
    assert (run / "checkpoint_latest" / "model.safetensors").read_bytes() == before
    assert len(open(run / "metrics.csv").read().strip().splitlines()) == 1 + 1  # header and its one epoch
