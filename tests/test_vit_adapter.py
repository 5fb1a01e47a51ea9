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
