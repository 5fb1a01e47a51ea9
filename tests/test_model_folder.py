"""A model folder is checked whole, and a run is refused before anything is allocated (issue 25): an edited
config.yaml or preprocessing.json is named in one line and can be accepted on purpose; the memory estimate
runs on the meta device before the model is built; the weak cases read as one line."""
import json

import pytest
import torch

from upernet_vit import UperNetViT
from upernet_vit import pretrained
from helpers import TINY, config_file, one_error_line, record_8bit, tiny_model, tiny_train_config

pytestmark = pytest.mark.reliability  # what a user's bad input, damaged file or crash leads to


@pytest.fixture
def folder(tmp_path):
    model = tiny_model(in_chans=1, num_classes=2)
    model.preprocessing = record_8bit(model)
    model.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


@pytest.mark.parametrize("old,new", [("norm: layernorm", "norm: groupnorm"), ("num_heads: 2", "num_heads: 4")])
def test_an_edited_config_that_keeps_the_shapes_is_named_and_can_be_accepted(folder, capsys, old, new):
    """Issue 25, bad case 5: such an edit loaded silently and moved the logits by 0.04."""
    from upernet_vit.cli import main

    config = folder / "config.yaml"
    assert old in config.read_text()
    config.write_text(config.read_text().replace(old, new))
    with pytest.raises(ValueError, match=r"config.yaml is damaged or was changed after it was saved: its sha256 is "
                                         r"[0-9a-f]{64} but .*SHA256SUMS records .*accept_edits"):
        UperNetViT.from_pretrained(folder)
    assert main(["accept-edits", str(folder)]) == 0
    assert "accepted the edits of config.yaml" in capsys.readouterr().out
    loaded = UperNetViT.from_pretrained(folder)
    assert new.split(": ")[1] in (loaded.config.decoder.norm, str(loaded.config.backbone_kwargs.get("num_heads")))
    assert pretrained.accept_edits(folder) == []  # nothing changed since


def test_an_edited_missing_or_added_record_is_named(folder):
    record = folder / "preprocessing.json"
    prep = json.loads(record.read_text())
    record.write_text(json.dumps({**prep, "intensity_scale": 1.0}))
    with pytest.raises(ValueError, match=r"preprocessing.json is damaged or was changed after it was saved"):
        UperNetViT.from_pretrained(folder)
    record.unlink()
    with pytest.raises(ValueError, match=r"preprocessing.json is missing, but .*SHA256SUMS lists it.*accept-edits"):
        UperNetViT.from_pretrained(folder)
    assert pretrained.accept_edits(folder) == ["preprocessing.json"]  # removed on purpose
    assert UperNetViT.from_pretrained(folder).preprocessing is None
    bare = folder.parent / "bare"
    tiny_model(in_chans=1, num_classes=2).save_pretrained(bare)
    (bare / "preprocessing.json").write_text(json.dumps(prep))  # copied in from another model
    with pytest.raises(ValueError, match=r"preprocessing.json was added after the model was saved"):
        UperNetViT.from_pretrained(bare)
    assert pretrained.accept_edits(bare) == ["preprocessing.json"]
    assert UperNetViT.from_pretrained(bare).preprocessing == prep


def test_older_folders_still_load_and_a_damaged_folder_is_not_accepted(folder):
    from upernet_vit.pretrained import LEGACY_CHECKSUM_NAME as CHECKSUM_NAME, file_sha256

    sums = folder / "SHA256SUMS"
    sums.unlink()  # a folder from before SHA256SUMS, with the weights' digest alone
    (folder / CHECKSUM_NAME).write_text(f"{file_sha256(str(folder / 'model.safetensors'))}  model.safetensors\n")
    UperNetViT.from_pretrained(folder)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-100] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model.safetensors is damaged or was changed .*model.safetensors.sha256 records"):
        UperNetViT.from_pretrained(folder)
    (folder / CHECKSUM_NAME).unlink()
    UperNetViT.from_pretrained(folder)  # no record at all: loads, as before checksums
    config = folder / "config.yaml"
    config.write_text(config.read_text().replace("hidden_size: 32", "hidden_size: 48"))
    with pytest.raises(ValueError, match=r"does not match .*config.yaml"):
        pretrained.accept_edits(folder)  # an edit that breaks the folder is not recorded
    assert not sums.exists()


# ---------------------------------------------------------------------------- nothing allocated before the estimate
def test_the_memory_estimate_runs_on_the_meta_device_before_the_model_is_built(tmp_path, monkeypatch):
    """Issue 25, bad case 7: the estimate ran after the build, so a run too large for the machine was killed
    by the kernel (exit 137) instead of refused with the estimate's message."""
    from upernet_vit.training import memory
    from upernet_vit.training.trainer import Trainer

    counted = []
    real = memory.estimate_training_memory

    def spy(model, *args, **kwargs):
        counted.append({p.device.type for p in model.parameters()})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(memory, "estimate_training_memory", spy)
    monkeypatch.setattr(memory, "available_memory", lambda device: 1000)  # a machine far too small
    monkeypatch.setattr(Trainer, "_build_model", lambda *a: pytest.fail("built before the estimate refused it"))
    with pytest.raises(ValueError, match=r"this run needs about .* but the device has 0.0 GB; change:"):
        Trainer(tiny_train_config(), str(tmp_path / "run"))
    assert counted == [{"meta"}]


# ---------------------------------------------------------------------------- the weak cases, one line each
def test_a_broken_yaml_override_names_its_key_and_exits_2(tmp_path, capsys):
    from upernet_vit.cli import main

    assert main(["train", config_file(tmp_path), "-o", "data.labels={bg: 0, a: 1", "--output", str(tmp_path / "r")]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert "--override data.labels: the value '{bg: 0, a: 1' is not valid YAML" in line and "<unicode string>" not in line
    assert not (tmp_path / "r").exists()


def test_a_bfloat16_backbone_made_trainable_by_hand_is_refused_by_the_optimizer():
    """Issue 25, weak: requires_grad_(True) on a bfloat16 backbone let AdamW train bfloat16 weights."""
    from upernet_vit.config import TrainConfig
    from upernet_vit.training.optim import build_optimizer

    model = UperNetViT("vit_small_patch16_224", None, 2, hidden_size=8, backbone_kwargs=TINY, backbone_dtype="bfloat16", freeze_backbone=True)
    build_optimizer(model, TrainConfig(), model.backbone.depth)  # frozen: fine
    model.requires_grad_(True)
    with pytest.raises(ValueError, match=r"trainable parameter\(s\) are stored in bfloat16 \(e.g. backbone.vit.*trains "
                                         r"through LoRA only"):
        build_optimizer(model, TrainConfig(), model.backbone.depth)


def test_exporting_a_bfloat16_model_names_the_fix(tmp_path):
    pytest.importorskip("onnxruntime")
    from upernet_vit.export import export_onnx

    model = UperNetViT("vit_small_patch16_224", None, 2, hidden_size=8, backbone_kwargs=TINY, backbone_dtype="bfloat16", freeze_backbone=True)
    with pytest.raises(ValueError, match=r"export takes a float32 model, but parameters are stored in bfloat16 .*"
                                         r"export model.float\(\)"):
        export_onnx(model, tmp_path / "m.onnx", 64, 64)
    assert not (tmp_path / "m.onnx").exists()


def test_a_model_folder_without_its_record_needs_an_explicit_scale(tmp_path, capsys):
    from upernet_vit.cli import main
    from helpers import gray

    tiny_model(in_chans=1, num_classes=2).save_pretrained(tmp_path / "bare")
    (tmp_path / "in").mkdir()
    gray(tmp_path / "in" / "x.png")
    args = ["predict", "--model", str(tmp_path / "bare"), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o")]
    assert main(args) == 2
    assert "preprocessing.json not found (a bare save_pretrained folder)" in one_error_line(capsys.readouterr().err, "predict")
    assert main(args + ["--intensity-scale", "-1"]) == 2
    assert "--intensity-scale -1.0: give a positive number" in one_error_line(capsys.readouterr().err, "predict")
    assert main(args + ["--intensity-scale", "255"]) == 0 and (tmp_path / "o" / "x.png").is_file()


@pytest.mark.slow  # two ONNX exports with onnxruntime checks: ~20-35 s on 2 cores
def test_the_export_command_exports_a_bfloat16_lora_model_in_float32_and_may_replace_its_own_file(tmp_path, capsys):
    """Issue 25, weak: onnxruntime's "InvalidGraph ... tensor(bfloat16) ... Conv" about a hidden temp file."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from upernet_vit.cli import main

    model = UperNetViT("vit_small_patch16_224", None, 2, in_chans=1, hidden_size=8, backbone_kwargs=TINY,
                       backbone_dtype="bfloat16", freeze_backbone=True)
    model.enable_lora(rank=2)
    model.save_pretrained(tmp_path / "m")
    out = str(tmp_path / "m.onnx")
    for _ in range(2):  # the second replaces the file the first wrote
        assert main(["export", str(tmp_path / "m"), "--output", out, "--height", "48", "--width", "48"]) == 0
    assert "max |onnxruntime - pytorch|" in capsys.readouterr().out
    metadata = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert metadata["written_by"] == "upernet-vit export"


def test_saving_a_model_without_a_record_removes_the_record_of_an_earlier_save(folder):
    """Otherwise the folder would pair the new weights with the old model's preprocessing record."""
    assert (folder / "preprocessing.json").is_file()
    model = tiny_model(in_chans=1, num_classes=2)
    assert model.preprocessing is None
    model.save_pretrained(folder)
    assert not (folder / "preprocessing.json").exists()
    assert "preprocessing.json" not in (folder / "SHA256SUMS").read_text()
    assert UperNetViT.from_pretrained(folder).preprocessing is None
