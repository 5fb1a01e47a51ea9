"""Tap rule, explicit taps, token-to-map extraction."""
import pytest
import timm
import torch

from upernet_vit import default_feature_indices
from upernet_vit.vit_adapter import extract_feature_maps, resolve_feature_indices


@pytest.mark.parametrize(
    "depth, taps", [(4, (0, 1, 2, 3)), (12, (2, 5, 8, 11)), (24, (5, 11, 17, 23)), (40, (9, 19, 29, 39))]
)
def test_default_taps(depth, taps):
    assert default_feature_indices(depth) == taps


@pytest.mark.parametrize("depth", [1, 2, 3, 6, 10])
def test_depth_the_rule_cannot_serve_is_a_clear_error(depth):
    with pytest.raises(ValueError, match=f"depth {depth}.*feature_indices"):
        default_feature_indices(depth)


def test_explicit_taps_override_and_validate():
    assert resolve_feature_indices(10, [1, 4, 6, -1]) == (1, 4, 6, 9)
    assert resolve_feature_indices(2, [0, 0, 1, 1]) == (0, 0, 1, 1)
    with pytest.raises(ValueError, match=r"\[12\] outside"):
        resolve_feature_indices(12, [2, 5, 8, 12])
    with pytest.raises(ValueError, match="4 blocks"):
        resolve_feature_indices(12, [2, 5])


def _manual_maps(vit, x, indices):
    """Reference: run blocks one by one, apply the final norm, drop prefix tokens, reshape."""
    tokens = vit.patch_embed(x)
    tokens = vit._pos_embed(tokens)
    tokens = vit.norm_pre(tokens)
    h, w = x.shape[-2] // 16, x.shape[-1] // 16
    out = {}
    for i, block in enumerate(vit.blocks):
        tokens = block(tokens)
        if i in indices:
            t = vit.norm(tokens)[:, vit.num_prefix_tokens :]
            out[i] = t.transpose(1, 2).reshape(x.shape[0], -1, h, w)
    return [out[i] for i in indices]


def test_extract_matches_manual_block_loop():
    vit = timm.create_model(
        "vit_small_patch16_224", pretrained=False, depth=4, embed_dim=32, num_heads=2, num_classes=0,
        dynamic_img_size=True, reg_tokens=2,
    ).eval()
    x = torch.randn(2, 3, 48, 80)
    indices = [1, 1, 2, 3]
    with torch.no_grad():
        got = extract_feature_maps(vit, x, indices)
        want = _manual_maps(vit, x, indices)
    assert [g.shape for g in got] == [(2, 32, 3, 5)] * 4
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-6)


def test_the_vitdet_pyramid_has_the_strides_and_fewer_parameters_at_large_widths():
    from upernet_vit.vit_adapter import SimpleFeaturePyramid, ViTDetFeaturePyramid

    pyramid = ViTDetFeaturePyramid(64, 24).eval()
    maps = [torch.randn(2, 64, 5, 7) for _ in range(4)]
    shapes = [tuple(m.shape) for m in pyramid(maps)]
    assert shapes == [(2, 24, 20, 28), (2, 24, 10, 14), (2, 24, 5, 7), (2, 24, 3, 4)] and pyramid.out_channels == (24,) * 4
    # the level-3 op is the max-pool; the projection follows it
    down = pyramid.projections[3](torch.nn.functional.max_pool2d(maps[3], 2, ceil_mode=True))
    assert torch.equal(pyramid(maps)[3], down)
    with torch.device("meta"):  # DINOv3-7B's width, hidden 512: counted without allocating
        wide = sum(p.numel() for p in ViTDetFeaturePyramid(4096, 512).parameters())
        simple = sum(p.numel() for p in SimpleFeaturePyramid(4096).parameters())
    assert wide < 0.5 * simple and 0.08e9 < wide < 0.1e9 and 0.19e9 < simple < 0.21e9


def test_the_model_builds_and_trains_with_the_vitdet_pyramid():
    from helpers import tiny_model

    model = tiny_model(pyramid="vitdet", hidden_size=16)
    assert type(model.adapter).__name__ == "ViTDetFeaturePyramid" and tuple(model.head.in_channels) == (16,) * 4
    logits = model(torch.randn(2, 3, 40, 56))
    assert logits.shape == (2, 3, 40, 56)
    logits.square().mean().backward()
    assert all(p.grad is not None for p in model.adapter.parameters())
