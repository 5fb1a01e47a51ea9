"""Shared test helpers (imported as a plain module: pytest puts tests/ on sys.path)."""
import json
import os

import numpy as np
import torch
from PIL import Image

from upernet_vit import UperNetViT

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout (tests/ mirrors the package)
TINY = dict(depth=4, embed_dim=32, num_heads=2)

# a 3-epoch training run on 10 demo cases of 32x32 px: seconds on a CPU
TINY_CONFIG = {
    "model": {"backbone": "vit_small_patch16_224", "backbone_size": None, "backbone_kwargs": TINY,
              "decoder": {"hidden_size": 16, "aux_head": True, "aux_channels": 8}},
    "train": {"num_epochs": 3, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1,
              "warmup_epochs": 1, "num_overlays": 2, "seed": 7},
    "data": {"format": "demo", "demo_cases": 10, "demo_image_size": 32, "patch_size": [32, 32],
             "batch_size": 2, "num_workers": 0},
}


def tiny_train_config(**sections):
    """:data:`TINY_CONFIG` with ``section={key: value}`` updates, as a Config."""
    from upernet_vit.config import load_config

    data = json.loads(json.dumps(TINY_CONFIG))
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return load_config(data)


def tiny_model(**overrides) -> UperNetViT:
    """A depth-4, width-32 ViT with a 32-channel head: fast enough for property tests."""
    kwargs = dict(
        backbone="vit_small_patch16_224",
        num_classes=3,
        in_chans=3,
        hidden_size=32,
        backbone_kwargs=dict(TINY),
    )
    kwargs.update(overrides)
    return UperNetViT(**kwargs)


def tiny_backbone_file(folder) -> str:
    """A timm-layout weights file of the :data:`TINY` ``vit_small_patch16_224`` (RGB) in ``folder``; its path.
    A run with ``backbone_dtype: bfloat16`` needs weights to fill its frozen backbone."""
    import timm

    path = str(folder / "tiny_vit.pth")
    torch.manual_seed(0)
    torch.save(timm.create_model("vit_small_patch16_224", num_classes=0, **TINY).state_dict(), path)
    return path


def record_8bit(model: UperNetViT) -> dict:
    """A ``preprocessing.json`` record for ``model`` as if trained on 8-bit images (preset normalization,
    labels 0..K-1, whole-image inference)."""
    return {"mean": list(model.mean), "std": list(model.std), "normalization": "preset",
            "label_values": list(range(model.num_classes)), "patch_size": None, "intensity_scale": 255.0,
            "intensity_range": [0.0, 255.0]}


def saved_8bit_model(folder, in_chans: int = 1, num_classes: int = 2) -> str:
    """A tiny model saved into ``folder`` with the record of a model trained on 8-bit images (``record_8bit``),
    as predict finds a trained model; returns the folder."""
    model = tiny_model(in_chans=in_chans, num_classes=num_classes)
    model.preprocessing = record_8bit(model)
    model.save_pretrained(folder)
    return str(folder)


def randomize_bn(module: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial BN statistics and affine params, so a wrong mapping or fold cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))


def grads(y: torch.Tensor, inputs, seed: int = 0):
    """Gradients of a random projection of ``y`` (no gradient cancels by symmetry)."""
    g = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((y * g).sum(), inputs)


def float_tiff(path, nan_at=()):
    """A 16 x 16 float32 TIFF of random values, NaN at each ``(y, x)`` of ``nan_at``."""
    image = np.random.default_rng(0).random((16, 16), dtype=np.float32)
    for yx in nan_at:
        image[yx] = np.nan
    Image.fromarray(image, mode="F").save(path)


def gray(path, value=100, size=(20, 24)):
    """A one-value 8-bit image (its type by the suffix of ``path``)."""
    Image.fromarray(np.full(size, value, dtype=np.uint8)).save(path)


def one_error_line(err: str, command: str) -> str:
    """The CLI's one-line error at the end of ``err`` (checked: no traceback, the command's prefix)."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith(f"upernet-vit {command}: error: "), err
    return lines[-1]


def config_file(tmp_path, **train):
    """:data:`TINY_CONFIG` with ``train`` updates, written to ``tmp_path/tiny.yaml``; its path."""
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(dict(TINY_CONFIG, train=dict(TINY_CONFIG["train"], **train))))
    return str(path)
