"""Presets, timm names, local timm-format checkpoints."""
import pytest
import timm
import torch
from safetensors.torch import save_file

from upernet_vit import create_backbone
from upernet_vit.backbones import IMAGENET_MEAN, IMAGENET_STD, PRESETS, adapt_patch_embed

from helpers import TINY

PRESET_CASES = [
    ("dinov2", "small", 14, 1),
    ("dinov2", "giant", 14, 1),
    ("dinov2_reg4", "base", 14, 5),
    ("dinov3", "large", 16, 5),
    ("dinov3", "7b", 16, 5),
    ("retfound", "large", 16, 1),
    ("visionfm", "base", 16, 1),
]


@pytest.mark.parametrize("family, size, patch, prefix", PRESET_CASES)
def test_presets_build_tiny_versions(family, size, patch, prefix):
    bb = create_backbone(family, size, in_chans=1, backbone_kwargs=TINY)
    assert bb.name == PRESETS[family].sizes[size]
    assert (bb.patch_size, bb.embed_dim, bb.depth, bb.num_prefix_tokens) == (patch, 32, 4, prefix)
    maps = bb.vit.forward_intermediates(
        torch.randn(1, 1, 3 * patch, 2 * patch), indices=[3], norm=True, intermediates_only=True
    )
    assert maps[0].shape == (1, 32, 3, 2)


def test_preset_normalization_stats():
    bb = create_backbone("retfound", "large", backbone_kwargs=TINY)
    assert bb.mean == IMAGENET_MEAN and bb.std == IMAGENET_STD  # timm's default for this arch is 0.5
    gray = create_backbone("dinov2", "small", in_chans=1, backbone_kwargs=TINY)
    assert gray.mean == pytest.approx((sum(IMAGENET_MEAN) / 3,))
    four = create_backbone("dinov3", "base", in_chans=4, backbone_kwargs=TINY)
    assert four.std == IMAGENET_STD + IMAGENET_STD[:1]


def test_any_timm_vit_name():
    bb = create_backbone("vit_base_patch8_224", None, backbone_kwargs=TINY)
    assert bb.patch_size == 8 and bb.mean == tuple(timm.create_model("vit_base_patch8_224").pretrained_cfg["mean"])


@pytest.mark.parametrize(
    "args, message",
    [
        (("dinov2", "huge"), r"sizes small, base, large, giant.*'huge'"),
        (("dinov3", "larg"), r"did you mean 'large'"),
        (("vit_small_patch16_224", "base"), r"only applies to the presets"),
        (("no_such_model", None), r"neither a preset nor a timm model name"),
        (("resnet18", None), r"not a plain ViT"),
    ],
)
def test_bad_backbone_names(args, message):
    with pytest.raises(ValueError, match=message):
        create_backbone(*args)


def test_reserved_backbone_kwargs():
    with pytest.raises(ValueError, match="checkpoint_path"):
        create_backbone("dinov2", "small", backbone_kwargs=dict(pretrained=True))


def _tiny_vit(**kw):
    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **TINY, **kw)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_checkpoint_round_trip(tmp_path, suffix):
    src = _tiny_vit()
    path = str(tmp_path / f"w{suffix}")
    state = src.state_dict()
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    bb = create_backbone("vit_small_patch16_224", None, checkpoint_path=path, backbone_kwargs=TINY)
    for k, v in state.items():
        assert torch.equal(bb.vit.state_dict()[k], v), k


def test_checkpoint_adapts_pos_embed_and_in_chans(tmp_path):
    src = _tiny_vit(img_size=64)  # 4x4 grid in the file, 14x14 in the model
    path = str(tmp_path / "w.pth")
    torch.save(src.state_dict(), path)
    bb = create_backbone("vit_small_patch16_224", None, in_chans=1, checkpoint_path=path, backbone_kwargs=TINY)
    assert bb.vit.pos_embed.shape == (1, 1 + 14 * 14, 32)
    assert torch.equal(bb.vit.patch_embed.proj.weight, src.patch_embed.proj.weight.sum(1, keepdim=True))
    gray = torch.rand(1, 1, 64, 64)
    # a gray image through the summed kernel equals the RGB model on the replicated image
    a = bb.vit.patch_embed.proj(gray)
    b = src.patch_embed.proj(gray.expand(1, 3, 64, 64))
    assert torch.allclose(a, b, atol=1e-5)


def test_adapt_patch_embed_many_channels():
    w = torch.randn(8, 3, 2, 2)
    w5 = adapt_patch_embed(w, 5)
    assert w5.shape == (8, 5, 2, 2)
    assert torch.allclose(w5[:, 3], w[:, 0] * 3 / 5) and torch.allclose(w5[:, 4], w[:, 1] * 3 / 5)
    # for a multiple of 3 the response to a constant image is unchanged
    w6 = adapt_patch_embed(w, 6)
    assert torch.allclose(w6.sum(1), w.sum(1), atol=1e-6)


def test_checkpoint_mismatch_names_keys(tmp_path):
    src = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, depth=6, embed_dim=32, num_heads=2)
    path = str(tmp_path / "w.pth")
    torch.save(src.state_dict(), path)
    with pytest.raises(ValueError) as err:
        create_backbone("vit_small_patch16_224", None, checkpoint_path=path, backbone_kwargs=TINY)
    text = str(err.value)
    assert "Unexpected keys" in text and "blocks.*.attn.qkv.weight (2)" in text and "size preset" in text


class PickledConfig:
    """Stands for the training-config objects some checkpoints pickle beside the weights."""


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        create_backbone("vit_small_patch16_224", None, checkpoint_path=str(tmp_path / "missing.pth"), backbone_kwargs=TINY)
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": {"a": torch.zeros(1)}, "args": PickledConfig()}, pickled)
    with pytest.raises(ValueError, match="weights-only"):
        create_backbone("vit_small_patch16_224", None, checkpoint_path=str(pickled), backbone_kwargs=TINY)
