"""UperNetViT: input checks, padding and cropping, aux head, upsamplers, freezing, LoRA, save/load."""
import os

import pytest
import torch

from upernet_vit import UperNetViT, create_segmentation_model
from upernet_vit.model import pad_to_multiple
from upernet_vit.upsampler import ProgressiveUpsampler
from upernet_vit.layers import resize
from helpers import TINY, tiny_model


@pytest.mark.parametrize("bad", [torch.randn(3, 32, 32), torch.randn(1, 1, 3, 32, 32), torch.randn(1, 2, 32, 32)])
def test_bad_input_shape_names_expected_and_received(bad):
    model = tiny_model()
    with pytest.raises(ValueError) as err:
        model(bad)
    assert "[B, 3, H, W]" in str(err.value) and str(tuple(bad.shape)) in str(err.value)


def test_pad_reflects_when_possible_and_replicates_otherwise():
    x = torch.arange(20.0).reshape(1, 1, 4, 5)
    padded = pad_to_multiple(x, 8)  # pad 4 rows (not < 4: replicate), 3 columns (< 5: reflect)
    assert padded.shape == (1, 1, 8, 8)
    assert torch.equal(padded[0, 0, 0, 5:], x[0, 0, 0, [3, 2, 1]])  # reflect
    assert torch.equal(padded[0, 0, 7, :5], x[0, 0, 3])  # replicate the last row
    assert torch.equal(pad_to_multiple(x[..., :4, :4], 4), x[..., :4, :4])


def test_output_is_the_crop_of_the_padded_prediction():
    model = tiny_model().eval()
    x = torch.randn(1, 3, 37, 21)
    with torch.no_grad():
        direct = model(x)
        padded = model(pad_to_multiple(x, 16))
    assert direct.shape == (1, 3, 37, 21)
    assert torch.allclose(direct, padded[..., :37, :21], atol=1e-6)


def test_backbone_features_shapes():
    model = tiny_model()
    maps = model.backbone_features(torch.randn(2, 3, 40, 64))
    assert [m.shape for m in maps] == [(2, 32, 3, 4)] * 4
    assert model.feature_indices == (0, 1, 2, 3)


def test_explicit_taps_prune_unused_blocks():
    model = tiny_model(feature_indices=[0, 0, 1, 1])
    assert len(model.backbone.vit.blocks) == 2
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_aux_head_returns_full_size_logits_only_when_asked():
    model = tiny_model(aux_head=True, aux_channels=8)
    x = torch.randn(2, 3, 30, 50)
    assert isinstance(model(x), torch.Tensor)
    logits, aux = model(x, return_aux=True)
    assert logits.shape == aux.shape == (2, 3, 30, 50)
    assert model.parameter_summary()["head"]["total"] > tiny_model().parameter_summary()["head"]["total"]
    with pytest.raises(ValueError, match="aux_head"):
        tiny_model()(x, return_aux=True)


def test_progressive_upsampler_starts_as_two_bilinear_steps_and_learns():
    up = ProgressiveUpsampler(num_classes=3)
    logits = torch.randn(2, 3, 5, 7, requires_grad=True)
    out = up(logits, (19, 27))
    assert torch.allclose(out, resize(resize(logits, (10, 14)), (19, 27)), atol=1e-6)
    out.pow(2).sum().backward()
    assert up.stages[1].refine[-1].weight.grad.abs().sum() > 0
    model = tiny_model(upsampler="progressive")
    assert model(torch.randn(1, 3, 20, 20)).shape == (1, 3, 20, 20)
    assert model.parameter_summary()["upsampler"]["trainable"] > 0
    with pytest.raises(ValueError, match="upsampler: expected one of 'bilinear', 'progressive'"):
        tiny_model(upsampler="nearest")


def test_freeze_backbone():
    model = tiny_model(freeze_backbone=True)
    s = model.parameter_summary()
    assert s["backbone"]["trainable"] == 0 and s["backbone"]["total"] > 0
    assert s["head"]["trainable"] == s["head"]["total"] and s["adapter"]["trainable"] == s["adapter"]["total"]
    assert s["all"]["total"] == sum(p.numel() for p in model.parameters())


def _lora_count(depth, dim, rank):
    return depth * rank * (dim + 3 * dim)  # qkv: A [r, D], B [3D, r]


def test_lora_trains_exactly_lora_and_decoder():
    model = tiny_model()
    before = model.parameter_summary()
    model.enable_lora(rank=4, alpha=8, dropout=0.0)
    s = model.parameter_summary()
    assert s["backbone"]["trainable"] == _lora_count(4, 32, 4)
    assert s["backbone"]["total"] == before["backbone"]["total"] + _lora_count(4, 32, 4)
    for part in ("adapter", "head", "upsampler"):
        assert s[part]["trainable"] == s[part]["total"] == before[part]["total"]
    trainable_backbone = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert trainable_backbone and all("lora_" in n for n in trainable_backbone)
    with pytest.raises(RuntimeError, match="already enabled"):
        model.enable_lora()


def test_lora_unknown_target_lists_layer_names():
    with pytest.raises(ValueError, match="linear layers are named: fc1, fc2, proj, qkv"):
        tiny_model().enable_lora(target_modules=("query",))


def _perturb_lora(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)


def test_merge_lora_keeps_outputs():
    model = tiny_model()
    model.enable_lora(rank=4, dropout=0.0)
    _perturb_lora(model)
    model.eval()
    x = torch.randn(1, 3, 48, 32)
    with torch.no_grad():
        before = model(x)
        model.merge_lora()
        after = model(x)
    assert torch.allclose(before, after, atol=1e-5)
    assert not any("lora" in k for k in model.state_dict())
    assert model.parameter_summary()["backbone"]["trainable"] == model.parameter_summary()["backbone"]["total"]


@pytest.mark.parametrize("lora", ["none", "enabled", "merged"])
def test_save_pretrained_round_trip(tmp_path, lora):
    model = tiny_model(num_classes=4, in_chans=1, upsampler="progressive", aux_head=True, norm="batchnorm")
    if lora != "none":
        model.enable_lora(rank=2, dropout=0.0)
        _perturb_lora(model)
    if lora == "merged":
        model.merge_lora()
    with torch.no_grad():  # non-default BN statistics must survive too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
    model.eval()
    model.save_pretrained(tmp_path / "run")
    assert sorted(os.listdir(tmp_path / "run")) == ["SHA256SUMS", "config.yaml", "model.safetensors"]
    loaded = UperNetViT.from_pretrained(tmp_path / "run").eval()
    assert loaded.lora_enabled == (lora == "enabled")
    x = torch.randn(2, 1, 35, 29)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
        assert torch.equal(model(x, return_aux=True)[1], loaded(x, return_aux=True)[1])


def test_from_pretrained_does_not_reread_backbone_checkpoint(tmp_path):
    import timm

    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **TINY)
    ckpt = tmp_path / "backbone.pth"
    torch.save(vit.state_dict(), ckpt)
    model = tiny_model(checkpoint_path=str(ckpt))
    model.save_pretrained(tmp_path / "run")
    ckpt.unlink()
    loaded = UperNetViT.from_pretrained(tmp_path / "run")
    assert loaded.config.checkpoint_path == str(ckpt)  # kept as provenance


def test_from_pretrained_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        UperNetViT.from_pretrained(tmp_path)


def test_factory_keywords_and_unknown_keyword():
    model = create_segmentation_model(
        backbone_name="dinov3", backbone_size="small", num_classes=4, use_lora=True, lora_rank=4,
        lora_alpha=8, lora_dropout=0.0, lora_target_modules=["qkv"], hidden_size=16, pool_scales=(1, 2),
        in_chans=1, backbone_kwargs=TINY,
    )
    assert model.lora_enabled and model.head.ppm.pool_scales == (1, 2) and model.head.channels == 16
    assert model.parameter_summary()["backbone"]["trainable"] == _lora_count(4, 32, 4)
    with pytest.raises(TypeError, match=r"\['hiden_size'\].*accepted: backbone_name"):
        create_segmentation_model(hiden_size=256)


def test_batch_size_one_trains_with_defaults():
    model = tiny_model().train()
    model(torch.randn(1, 3, 16, 16)).mean().backward()  # a 1x1 token grid: PPM pools 1x1 maps
    assert model.head.ppm.stages[0].conv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        tiny_model(norm="batchnorm").train()(torch.randn(1, 3, 16, 16))


def test_config_must_be_serializable_at_construction():
    with pytest.raises(ValueError, match="backbone_kwargs .* plain values"):
        tiny_model(backbone_kwargs=dict(TINY, act_layer=torch.nn.GELU))


def test_to_config_is_a_copy():
    model = tiny_model()
    cfg = model.to_config()
    cfg.model.decoder.hidden_size = 999
    cfg.model.backbone_kwargs["depth"] = 99
    assert model.config.decoder.hidden_size == 32 and model.config.backbone_kwargs["depth"] == 4


def test_saved_files_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        tiny_model().save_pretrained(tmp_path / "run")
    finally:
        os.umask(old)
    names = ["SHA256SUMS", "config.yaml", "model.safetensors"]
    for name in names:
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o644
    assert sorted(os.listdir(tmp_path / "run")) == names  # no temp files left


def test_fc_norm_backbones_get_a_final_norm_on_taps():
    """EVA-02 keeps its final norm as fc_norm (norm is Identity); the taps must be normalized anyway."""
    model = UperNetViT("eva02_tiny_patch14_224", None, 2, hidden_size=16, backbone_kwargs=TINY)
    assert not isinstance(model.backbone.vit.norm, torch.nn.Identity)
    maps = model.backbone_features(torch.randn(1, 3, 28, 28))
    tokens = maps[-1].flatten(2).transpose(1, 2)  # [B, N, D], LayerNorm at init: zero mean per token
    assert tokens.mean(-1).abs().max() < 1e-4


def test_lora_bad_rank():
    with pytest.raises(ValueError, match="LoRA r: must be >= 1"):
        tiny_model().enable_lora(rank=0)


def test_depth_reflects_pruning():
    assert tiny_model(feature_indices=[0, 1, 1, 2]).backbone.depth == 3


def test_backbone_size_is_optional_where_it_is_unambiguous():
    assert UperNetViT("vit_small_patch16_224", num_classes=2, backbone_kwargs=TINY).config.backbone_size is None
    assert UperNetViT(backbone="retfound", num_classes=2, backbone_kwargs=TINY).config.backbone_size == "large"
    assert UperNetViT(backbone="visionfm", num_classes=2, backbone_kwargs=TINY).backbone.name == "vit_base_patch16_224"
    with pytest.raises(ValueError, match="'dinov2' has sizes small, base, large, giant; got no backbone_size"):
        UperNetViT(backbone="dinov2", num_classes=2)
    with pytest.raises(ValueError, match="num_classes is not set"):
        UperNetViT(backbone="retfound", backbone_kwargs=TINY)


def test_options_are_the_model_config_fields():
    import numpy as np

    from upernet_vit import ConfigError
    from upernet_vit.config import ModelConfig

    model = tiny_model(hidden_size=16, pool_scales=(1, 2), feature_indices=(0, 1, 2, 3), num_classes=np.int64(4))
    cfg = model.config
    assert (cfg.decoder.hidden_size, cfg.decoder.pool_scales, cfg.feature_indices, cfg.num_classes) == (16, [1, 2], [0, 1, 2, 3], 4)
    assert UperNetViT(cfg).state_dict().keys() == model.state_dict().keys()  # a ModelConfig builds the same model
    assert UperNetViT(cfg, num_classes=2).num_classes == 2
    with pytest.raises(TypeError, match=r"unknown model option 'hiden_size' \(did you mean 'hidden_size'\?\)"):
        tiny_model(hiden_size=16)
    with pytest.raises(ConfigError, match=r"decoder\.hidden_size: must be >= 1, got 0"):
        tiny_model(hidden_size=0)
    with pytest.raises(ConfigError, match="in_chans: expected an integer"):
        tiny_model(in_chans="3")
    with pytest.raises(ConfigError, match="dropout: must be in"):
        ModelConfig().decoder.__class__(dropout=1.0)
    with pytest.raises(ConfigError, match=r"backbone: expected a string, got \['dinov2'\]"):
        UperNetViT(["dinov2"], num_classes=2)


def test_every_option_reaches_every_entry_point():
    """A new ModelConfig field needs no other declaration: kwargs, from_config, YAML and the factory take it."""
    import dataclasses

    from upernet_vit.config import DecoderConfig, ModelConfig

    base = tiny_model(norm="groupnorm", upsampler="progressive", aux_head=True, aux_channels=8, dropout=0.2).config
    options = {f.name: getattr(base, f.name) for f in dataclasses.fields(ModelConfig) if f.name != "decoder"}
    options.update({f.name: getattr(base.decoder, f.name) for f in dataclasses.fields(DecoderConfig)})
    built = [
        UperNetViT(**options),
        UperNetViT.from_config({"model": {"backbone": "dinov2", "backbone_size": "small"}}, **options),
        create_segmentation_model(backbone_name=options.pop("backbone"), **options),
    ]
    for model in built:
        assert model.config == base


def test_default_model_imports_neither_fast_nor_export_paths():
    import subprocess
    import sys

    code = (
        "import sys, torch; sys.path.insert(0, 'tests'); from helpers import tiny_model\n"
        "model = tiny_model().train(); model(torch.randn(2, 3, 40, 36)).square().mean().backward()\n"
        "model.eval(); torch.no_grad()(model)(torch.randn(1, 3, 20, 20))\n"
        "print(sorted(m for m in sys.modules if m.startswith(('upernet_vit.fast', 'upernet_vit.export'))))"
    )
    root = os.path.join(os.path.dirname(__file__), "..")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_torch_floor_is_guarded_and_declared():
    from upernet_vit import TORCH_MIN, _check_torch_version

    _check_torch_version("2.7.0")
    _check_torch_version("2.14.1+cu130")
    with pytest.raises(ImportError, match=r"torch >= 2\.7, found 2\.6\.1"):
        _check_torch_version("2.6.1")
    setup = open(os.path.join(os.path.dirname(__file__), "..", "setup.cfg"), encoding="utf-8").read()
    assert f"torch>={TORCH_MIN[0]}.{TORCH_MIN[1]}\n" in setup
