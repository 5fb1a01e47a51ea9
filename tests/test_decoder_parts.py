"""PPM, FPN, SFP and head: shapes, strides, concat orders."""
import pytest
import torch

from upernet_vit import FPNFusion, PyramidPoolingModule, SimpleFeaturePyramid, UperNetHead
from upernet_vit.layers import build_norm2d


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (8, 8)])
def test_ppm_keeps_size_and_sets_channels(size):
    ppm = PyramidPoolingModule(in_channels=12, channels=8, pool_scales=(1, 2, 3, 6))
    out = ppm(torch.randn(2, 12, *size))
    assert out.shape == (2, 8, *size)
    # bottleneck sees [x, p1..p4]: 12 + 4*8 input channels
    assert ppm.bottleneck.conv.in_channels == 12 + 4 * 8


def test_ppm_pooled_branch_is_global_context():
    """Pool scale 1 broadcasts one value per channel: changing one pixel moves every output pixel."""
    ppm = PyramidPoolingModule(4, 4, pool_scales=(1,), norm="none").eval()
    x = torch.randn(1, 4, 9, 9)
    y = x.clone()
    y[..., 0, 0] += 5.0
    diff = (ppm(x) - ppm(y)).abs().sum(1)[0]
    # the 3x3 bottleneck alone reaches only 2x2 around (0, 0); the far corner changes through pooling
    assert diff[8, 8] > 0


def test_fpn_fuses_at_finest_level():
    fpn = FPNFusion(in_channels=[5, 6, 7], channels=8)
    feats = [torch.randn(2, 5, 16, 20), torch.randn(2, 6, 8, 10), torch.randn(2, 7, 4, 5)]
    top = torch.randn(2, 8, 2, 3)
    out = fpn(feats, top)
    assert out.shape == (2, 8, 16, 20)
    assert fpn.fpn_bottleneck.conv.in_channels == 4 * 8
    assert len(fpn.fpn_convs) == 3  # the top (PSP) level gets no fpn conv


def test_fpn_top_down_is_cumulative():
    """The finest output depends on the top map even when the stride-8 lateral is zeroed."""
    fpn = FPNFusion([4, 4], 4, norm="none").eval()
    with torch.no_grad():
        fpn.lateral_convs[1].conv.weight.zero_()
        fpn.lateral_convs[1].conv.bias.zero_()
    feats = [torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4)]
    a = fpn(feats, torch.zeros(1, 4, 2, 2))
    b = fpn(feats, torch.ones(1, 4, 2, 2))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("grid", [(1, 1), (2, 3), (37, 37), (6, 8)])
def test_sfp_strides(grid):
    sfp = SimpleFeaturePyramid(embed_dim=16)
    h, w = grid
    maps = [torch.randn(2, 16, h, w) for _ in range(4)]
    outs = sfp(maps)
    expected = [(4 * h, 4 * w), (2 * h, 2 * w), (h, w), (-(-h // 2), -(-w // 2))]
    assert [tuple(o.shape[-2:]) for o in outs] == expected
    assert all(o.shape[:2] == (2, 16) for o in outs)
    assert outs[2] is maps[2]  # 1x is the identity


def test_sfp_each_map_gets_its_own_op():
    sfp = SimpleFeaturePyramid(8)
    maps = [torch.randn(1, 8, 4, 4) for _ in range(4)]
    base = sfp(maps)
    changed = list(maps)
    changed[1] = torch.randn(1, 8, 4, 4)
    outs = sfp(changed)
    assert torch.equal(outs[0], base[0]) and torch.equal(outs[2], base[2]) and torch.equal(outs[3], base[3])
    assert not torch.equal(outs[1], base[1])


def test_sfp_downsample_is_max_pool():
    sfp = SimpleFeaturePyramid(1)
    m = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = sfp([m, m, m, m])[3]
    assert torch.equal(out, torch.tensor([[[[5.0, 7.0], [13.0, 15.0]]]]))


@pytest.mark.parametrize("sizes", [[(16, 16), (8, 8), (4, 4), (2, 2)], [(13, 7), (7, 4), (4, 2), (1, 1)]])
def test_head_output_at_first_map_size(sizes):
    head = UperNetHead([8, 8, 8, 8], channels=16, num_classes=5)
    feats = [torch.randn(2, 8, *s) for s in sizes]
    assert head(feats).shape == (2, 5, *sizes[0])


def test_head_rejects_wrong_channels_with_shapes_in_message():
    head = UperNetHead([8, 8, 8, 8], channels=16, num_classes=2)
    with pytest.raises(ValueError, match=r"C = \[8, 8, 8, 8\]"):
        head([torch.randn(1, 7, 4, 4)] * 4)


def test_aux_head_only_when_asked():
    head = UperNetHead([8, 8, 8, 8], channels=16, num_classes=2, aux_head=True, aux_channels=4)
    feats = [torch.randn(1, 8, s, s) for s in (16, 8, 4, 2)]
    assert isinstance(head(feats), torch.Tensor)
    logits, aux = head(feats, return_aux=True)
    assert logits.shape == (1, 2, 16, 16) and aux.shape == (1, 2, 4, 4)
    with pytest.raises(ValueError, match="aux_head"):
        UperNetHead([8, 8, 8, 8], channels=16, num_classes=2)(feats, return_aux=True)


def test_default_norm_trains_at_batch_size_one():
    head = UperNetHead([8, 8, 8, 8], channels=16, num_classes=2).train()
    feats = [torch.randn(1, 8, s, s) for s in (8, 4, 2, 1)]
    head(feats).sum().backward()
    bn_head = UperNetHead([8, 8, 8, 8], channels=16, num_classes=2, norm="batchnorm").train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn_head(feats)


@pytest.mark.parametrize("channels, groups", [(7, 1), (16, 2), (32, 4), (100, 10), (512, 32)])
def test_groupnorm_any_channel_count(channels, groups):
    norm = build_norm2d("groupnorm", channels)
    assert norm.num_groups == groups and channels // groups >= min(8, channels)
    assert norm(torch.randn(1, channels, 3, 3)).shape == (1, channels, 3, 3)
    with pytest.raises(ValueError, match="choose one of"):
        build_norm2d("bn", channels)


def test_exportable_adaptive_pool_equals_torch():
    """The PPM's pooling when exported (matrices from the run-time size) matches torch's bins at every size."""
    from upernet_vit.ppm import adaptive_avg_pool2d_any_size

    for h in range(1, 15):
        for w in (1, 2, 5, 7, 12, 13):
            x = torch.randn(2, 3, h, w)
            for scale in (1, 2, 3, 6):
                expected = torch.nn.functional.adaptive_avg_pool2d(x, scale)
                assert torch.allclose(adaptive_avg_pool2d_any_size(x, scale), expected, atol=1e-6), (h, w, scale)
