"""Official checkpoint layouts: tiny files in each layout load strictly, and the backbone features equal
the official forward (reference re-implementations in official_reference.py) at the native size and
at other sizes, non-square included."""
import argparse
import os

import pytest
import torch

from upernet_vit import UperNetViT
from upernet_vit.backbones import NORM_STATS, read_checkpoint
from official_reference import ReferenceViT

TAPS = [0, 1, 2, 3]


def _feature_diff(model, ref, x, ref_x=None) -> float:
    """Max |ours - official| over the 4 tapped maps."""
    with torch.no_grad():
        ours = model.backbone_features(x)
    want = ref.get_intermediate_layers(x if ref_x is None else ref_x, TAPS)
    return max((a - b).abs().max().item() for a, b in zip(ours, want))


def _hub(ref):
    return ref.state_dict()


def _dinov2_training(ref):
    """{"teacher": {"backbone.blocks.{chunk}.{i}...", "dino_head.*", "ibot_head.*"}} with 2 chunks."""
    state = {}
    for key, value in ref.state_dict().items():
        if key.startswith("blocks."):
            index = int(key.split(".")[1])
            key = f"blocks.{index // 2}.{key.split('.', 1)[1]}"
        state[f"backbone.{key}"] = value
    state["dino_head.mlp.0.weight"] = torch.randn(8, 4)
    state["ibot_head.last_layer.weight_g"] = torch.randn(8, 1)
    return {"teacher": state}


def _mae(ref):
    return {"model": ref.state_dict(), "epoch": 799, "args": argparse.Namespace(model="mae_vit_large_patch16")}


def _visionfm(ref):
    teacher = {f"backbone.{k}": v for k, v in ref.state_dict().items()}
    teacher["head.mlp.0.weight"] = torch.randn(8, 4)
    student = {f"module.{k}": v.clone() + 1 for k, v in teacher.items()}  # must not be used
    student["module.backbone.masked_embed"] = torch.zeros(1, 32)
    return {"student": student, "teacher": teacher, "optimizer": {}, "epoch": 3,
            "args": argparse.Namespace(arch="vit_base")}


def _retfound_dinov2(ref):
    teacher = {f"backbone.{k}": v for k, v in ref.state_dict().items()}
    teacher["dino_head.mlp.0.weight"] = torch.randn(8, 4)
    teacher["ibot_head.mlp.0.weight"] = torch.randn(8, 4)
    return {"teacher": teacher}


# (id, preset, size, reference style, ref kwargs, file maker, sizes to compare: native first)
CASES = [
    ("dinov2-hub", "dinov2", "small", "dinov2", dict(dim=32, patch=14, img_size=518), _hub,
     [(518, 518), (14 * 20, 14 * 20), (14 * 9, 14 * 13)]),
    ("dinov2-training-chunked", "dinov2", "base", "dinov2", dict(dim=32, patch=14, img_size=518), _dinov2_training,
     [(518, 518), (14 * 10, 14 * 6)]),
    ("dinov2-reg4", "dinov2_reg4", "large", "dinov2_reg", dict(dim=32, patch=14, img_size=518), _hub,
     [(518, 518), (14 * 20, 14 * 20), (14 * 9, 14 * 13)]),
    ("dinov2-giant-swiglu", "dinov2", "giant", "dinov2", dict(dim=48, patch=14, img_size=518, mlp="swiglu_packed"), _hub,
     [(518, 518), (14 * 7, 14 * 11)]),
    ("retfound-mae", "retfound", "large", "mae", dict(dim=32, patch=16, img_size=224), _mae,
     [(224, 224), (256, 256), (16 * 9, 16 * 17)]),
    ("retfound-dinov2", "retfound_dinov2", "large", "mae", dict(dim=32, patch=14, img_size=224), _retfound_dinov2,
     [(224, 224), (14 * 20, 14 * 20), (14 * 9, 14 * 13)]),
    ("visionfm", "visionfm", "base", "visionfm", dict(dim=32, patch=16, img_size=224), _visionfm,
     [(224, 224), (256, 256), (16 * 9, 16 * 17)]),
]


def _retfound_dinov2_ref(style, kw):
    """RETFound-DINOv2 is DINOv2 architecture (LayerScale) resampled the MAE way."""
    ref = ReferenceViT("dinov2", depth=4, heads=2, **kw)
    ref.style = style
    return ref


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_official_layout_loads_and_matches_official_features(tmp_path, case):
    name, preset, size, style, kw, make_file, sizes = case
    torch.manual_seed(0)
    ref = _retfound_dinov2_ref(style, kw) if name == "retfound-dinov2" else ReferenceViT(style, depth=4, heads=2, **kw)
    ref.eval()
    path = tmp_path / "official.pth"
    torch.save(make_file(ref), path)
    model = UperNetViT(preset, size, 2, checkpoint_path=str(path), hidden_size=8, feature_indices=TAPS,
                       backbone_kwargs=dict(depth=4, embed_dim=kw["dim"], num_heads=2)).eval()
    for h, w in sizes:
        diff = _feature_diff(model, ref, torch.randn(1, 3, h, w))
        assert diff <= 1e-5, f"{name} at {h}x{w}: max |diff| {diff:.2e}"


def test_dinov2_file_into_a_smaller_native_grid_follows_the_offset_rule(tmp_path):
    """img_size=224 model, 518 px file: pos_embed resampled once at load as DINOv2 resamples at 224 px."""
    torch.manual_seed(0)
    ref = ReferenceViT("dinov2", dim=32, depth=4, heads=2, patch=14, img_size=518).eval()
    torch.save(ref.state_dict(), tmp_path / "dinov2.pth")
    model = UperNetViT("dinov2", "small", 2, checkpoint_path=str(tmp_path / "dinov2.pth"), feature_indices=TAPS,
                       backbone_kwargs=dict(depth=4, embed_dim=32, num_heads=2, img_size=224)).eval()
    assert _feature_diff(model, ref, torch.randn(1, 3, 224, 224)) <= 1e-5


def _dinov3_ref(mlp="gelu", zero_qv_bias=False):
    torch.manual_seed(1)
    ref = ReferenceViT("dinov3", dim=32, depth=4, heads=2, patch=16, mlp=mlp).eval()
    if zero_qv_bias:  # as in the released B/16 and S+/16 files: qkv.bias * bias_mask == 0
        with torch.no_grad():
            for block in ref.blocks:
                block.attn.qkv.bias.zero_()
    return ref


@pytest.mark.parametrize(
    "preset, size, mlp, zero_bias",
    [("dinov3_qkvb", "small", "gelu", False), ("dinov3", "base", "gelu", True), ("dinov3", "small_plus", "swiglu", True)],
)
def test_dinov3_layout_matches_official_rope_features(tmp_path, preset, size, mlp, zero_bias):
    ref = _dinov3_ref(mlp, zero_bias)
    path = tmp_path / "dinov3.pth"
    torch.save(ref.state_dict(), path)
    model = UperNetViT(preset, size, 2, checkpoint_path=str(path), hidden_size=8,
                       backbone_kwargs=dict(depth=4, embed_dim=32, num_heads=2)).eval()
    # the file's bf16-rounded periods are used, not recomputed fp32 ones
    assert torch.equal(model.backbone.vit.rope.periods, ref.rope_embed.periods)
    for h, w in [(224, 224), (16 * 5, 16 * 9), (16 * 12, 16 * 7)]:
        diff = _feature_diff(model, ref, torch.randn(2, 3, h, w))
        assert diff <= 1e-5, f"{preset} at {h}x{w}: max |diff| {diff:.2e}"


def test_dinov3_periods_survive_save_and_load(tmp_path):
    ref = _dinov3_ref(zero_qv_bias=True)
    torch.save(ref.state_dict(), tmp_path / "dinov3.pth")
    model = UperNetViT("dinov3", "small", 2, checkpoint_path=str(tmp_path / "dinov3.pth"), hidden_size=8,
                       backbone_kwargs=dict(depth=4, embed_dim=32, num_heads=2))
    model.save_pretrained(tmp_path / "run")
    loaded = UperNetViT.from_pretrained(tmp_path / "run")
    assert torch.equal(loaded.backbone.vit.rope.periods, ref.rope_embed.periods)


def test_dinov3_nonzero_qv_bias_needs_the_qkvb_variant(tmp_path):
    torch.save(_dinov3_ref().state_dict(), tmp_path / "dinov3.pth")
    with pytest.raises(ValueError, match="non-zero q/v biases.*dinov3_qkvb"):
        UperNetViT("dinov3", "small", 2, checkpoint_path=str(tmp_path / "dinov3.pth"),
                   backbone_kwargs=dict(depth=4, embed_dim=32, num_heads=2))


def test_gray_input_from_rgb_official_weights(tmp_path):
    torch.manual_seed(0)
    ref = ReferenceViT("mae", dim=32, depth=4, heads=2, patch=16).eval()
    torch.save(_mae(ref), tmp_path / "retfound.pth")
    model = UperNetViT("retfound", "large", 2, in_chans=1, checkpoint_path=str(tmp_path / "retfound.pth"),
                       feature_indices=TAPS, backbone_kwargs=dict(depth=4, embed_dim=32, num_heads=2)).eval()
    gray = torch.randn(1, 1, 160, 224)
    assert _feature_diff(model, ref, gray, gray.expand(1, 3, 160, 224)) <= 1e-5


def test_wrong_family_is_a_clear_error(tmp_path):
    torch.save(_dinov3_ref().state_dict(), tmp_path / "dinov3.pth")
    with pytest.raises(ValueError) as err:
        UperNetViT("retfound", "large", 2, checkpoint_path=str(tmp_path / "dinov3.pth"),
                   backbone_kwargs=dict(depth=4, embed_dim=32, num_heads=2))
    text = str(err.value)
    assert "read as format 'dinov3'" in text and "expects 'retfound_mae'" in text
    assert "Missing keys" in text and "pos_embed" in text and "Likely cause" in text


def test_wrong_size_lists_grouped_keys(tmp_path):
    torch.manual_seed(0)
    ref = ReferenceViT("dinov2", dim=32, depth=6, heads=2, patch=14, img_size=518)
    torch.save(ref.state_dict(), tmp_path / "dinov2.pth")
    with pytest.raises(ValueError, match=r"(?s)vit_small_patch14_dinov2.*Unexpected keys \(28\): .*blocks\.\*\.norm1\.weight \(2\)"):
        UperNetViT("dinov2", "small", 2, checkpoint_path=str(tmp_path / "dinov2.pth"),
                   backbone_kwargs=dict(depth=4, embed_dim=32, num_heads=2))


class Pickled:
    """Stands for an arbitrary object that only full unpickling can restore."""


def test_pickle_only_files_need_trust(tmp_path):
    torch.manual_seed(0)
    ref = ReferenceViT("visionfm", dim=32, depth=4, heads=2, patch=16)
    file = _visionfm(ref)
    file["extra"] = Pickled()
    torch.save(file, tmp_path / "vfm.pth")
    kwargs = dict(backbone_kwargs=dict(depth=4, embed_dim=32, num_heads=2), hidden_size=8)
    with pytest.raises(ValueError, match=r"vfm\.pth.*trust_checkpoint=True"):
        UperNetViT("visionfm", "base", 2, checkpoint_path=str(tmp_path / "vfm.pth"), **kwargs)
    model = UperNetViT("visionfm", "base", 2, checkpoint_path=str(tmp_path / "vfm.pth"), trust_checkpoint=True, **kwargs)
    assert torch.equal(model.backbone.vit.cls_token, ref.cls_token)
    # argparse.Namespace alone (MAE/DINO trainers save it as "args") needs no trust
    assert isinstance(read_checkpoint(str(_save(tmp_path / "ns.pth", _mae(ReferenceViT("mae", 32, 1, 2, 16))))) ["args"], argparse.Namespace)


def _save(path, obj):
    torch.save(obj, path)
    return path


def test_format_override_and_unknown_format(tmp_path):
    torch.manual_seed(0)
    ref = ReferenceViT("visionfm", dim=32, depth=4, heads=2, patch=16)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in ref.state_dict().items()}}, tmp_path / "vfm.pth")
    kwargs = dict(backbone_kwargs=dict(depth=4, embed_dim=32, num_heads=2), hidden_size=8)
    model = UperNetViT("visionfm", "base", 2, checkpoint_path=str(tmp_path / "vfm.pth"), checkpoint_format="visionfm", **kwargs)
    assert torch.equal(model.backbone.vit.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)
    with pytest.raises(ValueError, match="checkpoint_format: expected one of 'auto', .* got 'dino'"):
        UperNetViT("visionfm", "base", 2, checkpoint_path=str(tmp_path / "vfm.pth"), checkpoint_format="dino", **kwargs)


def test_named_normalization_stats():
    model = UperNetViT("visionfm", "base", 2, norm_stats="visionfm_oct", hidden_size=8,
                       backbone_kwargs=dict(depth=4, embed_dim=32, num_heads=2))
    assert model.mean == NORM_STATS["visionfm_oct"][0]
    sat = UperNetViT("dinov3_sat", "large", 2, hidden_size=8, backbone_kwargs=dict(depth=4, embed_dim=32, num_heads=2))
    assert sat.std == (0.213, 0.156, 0.143)
    with pytest.raises(ValueError, match="unknown norm_stats 'visionfm_octt'.*did you mean 'visionfm_oct'"):
        UperNetViT("visionfm", "base", 2, norm_stats="visionfm_octt", backbone_kwargs=dict(depth=4, embed_dim=32, num_heads=2))


# ---------------------------------------------------------------------------- pretrained=True (timm tags)
def _timm_file(model, path):
    """The backbone's weights as timm's hub file holds them: timm layout, safetensors, no RoPE periods."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.backbone.vit.state_dict().items() if not k.endswith("rope.periods")}
    save_file(state, str(path))
    return dict(file=str(path))  # timm's pretrained_cfg_overlay: load from this file, not the hub


@pytest.mark.parametrize("preset, size, tag", [("dinov2", "small", "vit_small_patch14_dinov2.lvd142m"),
                                               ("dinov3", "base", "vit_base_patch16_dinov3.lvd1689m")])
def test_a_preset_loaded_by_tag_equals_the_official_file(tmp_path, preset, size, tag):
    """The same weights by timm tag and by official file give the same features: the preset's pos-embed
    rule and normalization apply to both, and DINOv3's periods are the files' bf16-rounded ones."""
    from upernet_vit.backbones.factory import pretrained_timm_name
    from upernet_vit.backbones.presets import PRESETS

    tiny = dict(depth=4, embed_dim=32, num_heads=2)
    if preset == "dinov2":
        torch.manual_seed(0)
        ref = ReferenceViT("dinov2", depth=4, heads=2, dim=32, patch=14, img_size=518).eval()
    else:
        ref = _dinov3_ref(zero_qv_bias=True)
    torch.save(ref.state_dict(), tmp_path / "official.pth")
    official = UperNetViT(preset, size, 2, checkpoint_path=str(tmp_path / "official.pth"), hidden_size=8,
                          feature_indices=TAPS, backbone_kwargs=tiny).eval()
    overlay = _timm_file(official, tmp_path / "model.safetensors")
    assert pretrained_timm_name(preset, PRESETS[preset].sizes[size], PRESETS[preset]) == tag
    by_tag = UperNetViT(preset, size, 2, pretrained=True, hidden_size=8, feature_indices=TAPS,
                        backbone_kwargs=dict(tiny, pretrained_cfg_overlay=overlay)).eval()
    assert by_tag.mean == official.mean and by_tag.config.pretrained
    patch = by_tag.patch_size
    for h, w in [(patch * 9, patch * 13), (patch * 20, patch * 20)]:
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            diffs = [(a - b).abs().max().item() for a, b in zip(by_tag.backbone_features(x), official.backbone_features(x))]
        assert max(diffs) == 0.0, (h, w, diffs)
    by_tag.save_pretrained(tmp_path / "saved")
    os.remove(overlay["file"])  # from_pretrained takes the weights from the folder, fetching nothing
    loaded = UperNetViT.from_pretrained(tmp_path / "saved")
    assert loaded.config.pretrained and torch.equal(loaded.head.classifier.weight, by_tag.head.classifier.weight)


def test_a_timm_name_with_its_own_tag_and_the_errors(tmp_path):
    torch.manual_seed(0)
    tiny = dict(depth=4, embed_dim=32, num_heads=2)
    name = "vit_base_patch16_clip_224.openai"  # hub safetensors in every timm version CI installs
    donor = UperNetViT(name, None, 2, hidden_size=8, backbone_kwargs=tiny)
    overlay = _timm_file(donor, tmp_path / "w.safetensors")
    model = UperNetViT(name, None, 2, pretrained=True, hidden_size=8, backbone_kwargs=dict(tiny, pretrained_cfg_overlay=overlay))
    for key, value in donor.backbone.vit.state_dict().items():
        assert torch.equal(model.backbone.vit.state_dict()[key], value), key  # the file's weights arrived
    assert model.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))  # the tag's own (CLIP) normalization
    with pytest.raises(ValueError, match=r"both name backbone weights"):
        UperNetViT("dinov2", "small", 2, pretrained=True, checkpoint_path=str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match=r"'retfound' has no weights on timm's hub.*checkpoint_path"):
        UperNetViT("retfound", None, 2, pretrained=True)
    with pytest.raises(ValueError, match=r"no pretrained weights 'vit_small_patch14_dinov2.nope'.*lvd142m"):
        UperNetViT("vit_small_patch14_dinov2.nope", None, 2, pretrained=True)


def test_offline_without_a_cached_copy_names_the_tag_the_cache_and_the_alternative(tmp_path):
    """In a subprocess with HF_HUB_OFFLINE=1 and an empty cache: nothing touches the network."""
    import subprocess
    import sys

    code = ("from upernet_vit.cli import main; import sys; sys.exit(main(sys.argv[1:]))")
    config = tmp_path / "c.yaml"
    config.write_text("model: {backbone: dinov2, backbone_size: small, pretrained: true}\n"
                      "train: {num_epochs: 1}\ndata: {demo_cases: 4, demo_image_size: 32, patch_size: [28, 28], fold: all}\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, "-c", code, "train", str(config), "--output", str(tmp_path / "run")],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert "'vit_small_patch14_dinov2.lvd142m' (HF_HUB_OFFLINE is set)" in line
    assert str(tmp_path / "hf" / "hub") in line and "checkpoint_path" in line
