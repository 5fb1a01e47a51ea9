"""Every model option is wired: changing any ``ModelConfig``/``DecoderConfig`` field changes the built model
(its modules, weights, trainable set or input stats) or makes the step that reads it act (a loader error).
A new field without a row here fails ``test_every_field_has_a_row``, so a forgotten wiring line is caught."""
import dataclasses

import pytest
import torch

from upernet_vit import UperNetViT
from upernet_vit.config import ConfigError, DecoderConfig, ModelConfig
from helpers import TINY

BASE = dict(backbone="vit_small_patch16_224", num_classes=3, in_chans=3, hidden_size=16, backbone_kwargs=dict(TINY))


def _checkpoint(folder) -> str:
    """A timm-layout backbone file with weights other than the seeded init."""
    torch.manual_seed(123)
    torch.save(UperNetViT(**BASE).backbone.vit.state_dict(), folder / "vit.pth")
    return str(folder / "vit.pth")


def _hub_file(options, folder) -> str:
    """The backbone of ``options`` with other weights, as timm's hub holds it (safetensors): the file
    ``pretrained=True`` loads through ``pretrained_cfg_overlay``, without the network."""
    from safetensors.torch import save_file

    torch.manual_seed(123)
    kwargs = {k: v for k, v in options["backbone_kwargs"].items() if k != "pretrained_cfg_overlay"}
    state = UperNetViT(**{**options, "pretrained": False, "backbone_kwargs": kwargs}).backbone.vit.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "hub.safetensors"))
    return str(folder / "hub.safetensors")


# field -> (options changed from BASE, None: the model must differ | an error type the build must raise
# instead | a text the build must log)
ROWS = {
    "backbone": ({"backbone": "vit_base_patch8_224"}, None),
    "backbone_size": ({"backbone_size": "base"}, None),
    "num_classes": ({"num_classes": 4}, None),
    "in_chans": ({"in_chans": 1}, None),
    "checkpoint_path": ({"checkpoint_path": "CKPT"}, None),
    "pretrained": ({"pretrained": True}, None),
    "checkpoint_format": ({"checkpoint_path": "CKPT", "checkpoint_format": "retfound_mae"},
                          "(format retfound_mae,"),  # timm names pass every converter: the log tells,
    "trust_checkpoint": ({"checkpoint_path": "CKPT", "trust_checkpoint": True}, None),
    "norm_stats": ({"norm_stats": "visionfm_oct"}, None),
    "feature_indices": ({"feature_indices": [0, 0, 1, 2]}, None),
    "freeze_backbone": ({"freeze_backbone": True}, None),
    "gradient_checkpointing": ({"gradient_checkpointing": True}, None),
    "drop_path_rate": ({"drop_path_rate": 0.2}, None),
    "backbone_dtype": ({"backbone_dtype": "bfloat16", "freeze_backbone": True}, None),
    "backbone_kwargs": ({"backbone_kwargs": dict(TINY, depth=8)}, None),
    "hidden_size": ({"hidden_size": 24}, None),
    "pool_scales": ({"pool_scales": (1, 2)}, None),
    "norm": ({"norm": "groupnorm"}, None),
    "dropout": ({"dropout": 0.3}, None),
    "upsampler": ({"upsampler": "progressive"}, None),
    "pyramid": ({"pyramid": "vitdet"}, None),
    "aux_head": ({"aux_head": True}, None),
    "aux_channels": ({"aux_head": True, "aux_channels": 8}, None),
}
# with trust_checkpoint the base must hold a checkpoint too, else the row compares two random inits
BASE_FOR = {"trust_checkpoint": {"checkpoint_path": "CKPT"}, "checkpoint_format": {"checkpoint_path": "CKPT"},
            # timm's pretrained_cfg_overlay points pretrained=True at a local file: no network; a tag
            # whose hub file is safetensors in every timm CI installs (1.0.22 reads augreg tags as .npz)
            "pretrained": {"backbone": "vit_base_patch16_clip_224.openai",
                           "backbone_kwargs": dict(TINY, pretrained_cfg_overlay={"file": "HUB"})},
            "aux_channels": {"aux_head": True},
            "backbone_size": {"backbone": "dinov2", "backbone_size": "small", "backbone_kwargs": {"depth": 4}}}


def _fields():
    model = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "decoder"]
    return model + [f.name for f in dataclasses.fields(DecoderConfig)]


def test_every_field_has_a_row():
    assert sorted(ROWS) == sorted(_fields())


def _signature(model):
    vit = model.backbone.vit
    return (
        repr(model),
        {k: v.clone() for k, v in model.state_dict().items()},
        [p.requires_grad for p in model.parameters()],
        (model.mean, model.std, model.backbone.depth, bool(getattr(vit, "grad_checkpointing", False))),
    )


def _same(a, b):
    return (a[0] == b[0] and a[2] == b[2] and a[3] == b[3] and a[1].keys() == b[1].keys()
            and all(a[1][k].dtype == b[1][k].dtype and a[1][k].shape == b[1][k].shape and torch.equal(a[1][k], b[1][k])
                    for k in a[1]))


@pytest.mark.parametrize("field", sorted(ROWS))
def test_changing_a_field_changes_the_model(field, tmp_path_factory, monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no test touches the network
    checkpoint = _checkpoint(tmp_path_factory.mktemp("ckpt"))

    def build(options):
        options = {k: checkpoint if v == "CKPT" else v for k, v in options.items()}
        if "pretrained_cfg_overlay" in options.get("backbone_kwargs", {}):
            hub = _hub_file(options, tmp_path_factory.mktemp("hub"))
            options["backbone_kwargs"] = dict(options["backbone_kwargs"], pretrained_cfg_overlay={"file": hub})
        torch.manual_seed(0)
        return UperNetViT(**options)

    base = {**BASE, **BASE_FOR.get(field, {})}
    changed, error = ROWS[field]
    if field == "trust_checkpoint":  # the file needs unpickling only when it holds a custom object
        torch.save({"model": torch.load(checkpoint, weights_only=True), "args": _Custom()}, checkpoint)
        with pytest.raises(ValueError, match="trust_checkpoint=True"):
            build(base)
        base = dict(BASE)  # trusted: loads the file's weights, unlike a random init
    if isinstance(error, str):
        with caplog.at_level("INFO"):
            build({**base, **changed})
        assert error in caplog.text
        return
    if error is not None:
        build(base)
        with pytest.raises(error) as info:
            build({**base, **changed})
        assert not isinstance(info.value, ConfigError)  # the value reached the code that uses it
        return
    assert not _same(_signature(build(base)), _signature(build({**base, **changed})))


class _Custom:
    """An object only full unpickling can restore (as argparse namespaces of some training scripts)."""
