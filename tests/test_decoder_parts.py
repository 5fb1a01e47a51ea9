"""PPM, FPN, SFP and head: shapes, strides, concat orders, and the reference math."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

from upernet_vit import FPNFusion, PyramidPoolingModule, SimpleFeaturePyramid, UperNetHead
from upernet_vit.layers import build_norm2d
from helpers import randomize_bn, tiny_model

sizes = st.tuples(st.integers(1, 17), st.integers(1, 17))


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


@given(batch=st.integers(1, 2), grid=sizes, dim=st.integers(1, 8))
@example(batch=1, grid=(3, 5), dim=2)
@example(batch=1, grid=(1, 1), dim=1)
def test_sfp_half_level_is_ceil_mode_max_pool_of_its_map(batch, grid, dim):
    """The 0.5x level is ``max_pool2d(x, 2, ceil_mode=True)`` of the fourth map, odd grids included."""
    maps = [torch.randn(batch, dim, *grid) for _ in range(4)]
    out = SimpleFeaturePyramid(dim).eval()(maps)[3]
    assert torch.equal(out, F.max_pool2d(maps[3], 2, ceil_mode=True))


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


@given(batch=st.integers(1, 2), in_channels=st.integers(1, 6), channels=st.integers(1, 6), size=sizes,
       pool_scales=st.lists(st.integers(1, 7), min_size=1, max_size=4))
def test_ppm_shape_property(batch, in_channels, channels, size, pool_scales):
    ppm = PyramidPoolingModule(in_channels, channels, pool_scales)
    assert ppm(torch.randn(batch, in_channels, *size)).shape == (batch, channels, *size)


@given(batch=st.integers(1, 2), levels=st.lists(st.tuples(st.integers(1, 5), sizes), min_size=1, max_size=4),
       top=sizes, channels=st.integers(1, 6))
def test_fpn_output_is_at_the_finest_level_for_any_level_sizes(batch, levels, top, channels):
    """Levels of any sizes (not only halving ones, 1 x 1 included) fuse at the first level's size."""
    fpn = FPNFusion([c for c, _ in levels], channels)
    features = [torch.randn(batch, c, *s) for c, s in levels]
    out = fpn(features, torch.randn(batch, channels, *top))
    assert out.shape == (batch, channels, *levels[0][1])


@given(batch=st.integers(1, 2), grid=sizes, dim=st.integers(1, 8))
def test_sfp_strides_property(batch, grid, dim):
    """Any token grid h x w -> 4h x 4w, 2h x 2w, h x w, ceil(h/2) x ceil(w/2): strides p/4, p/2, p, 2p."""
    h, w = grid
    outs = SimpleFeaturePyramid(dim)([torch.randn(batch, dim, h, w) for _ in range(4)])
    assert [tuple(o.shape) for o in outs] == [
        (batch, dim, 4 * h, 4 * w), (batch, dim, 2 * h, 2 * w), (batch, dim, h, w), (batch, dim, -(-h // 2), -(-w // 2))
    ]


@given(batch=st.integers(1, 2), grid=sizes, num_classes=st.integers(1, 4))
def test_head_on_a_pyramid_of_any_grid(batch, grid, num_classes):
    """The head on the SFP's output for any grid, down to a 1 x 1 coarsest map: logits at stride p/4."""
    h, w = grid
    levels = SimpleFeaturePyramid(8)([torch.randn(batch, 8, h, w) for _ in range(4)])
    head = UperNetHead([8] * 4, channels=8, num_classes=num_classes)
    assert head(levels).shape == (batch, num_classes, 4 * h, 4 * w)


def _conv_norm_act(block, x):
    """conv -> eval BatchNorm -> ReLU, in functional form."""
    y = F.conv2d(x, block.conv.weight, block.conv.bias, padding=block.conv.padding)
    bn = block.norm
    return F.relu(F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))


def _reference_head(head, features):
    """UperNet as the paper and mmseg's uper_head.py write it: pool, resize, concat, conv."""
    def up(x, size):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    x = features[-1]
    psp = [x] + [up(_conv_norm_act(stage, F.adaptive_avg_pool2d(x, s)), x.shape[-2:])
                 for s, stage in zip(head.ppm.pool_scales, head.ppm.stages)]
    laterals = [_conv_norm_act(c, f) for c, f in zip(head.fpn.lateral_convs, features[:-1])]
    laterals.append(_conv_norm_act(head.ppm.bottleneck, torch.cat(psp, 1)))
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + up(laterals[i], laterals[i - 1].shape[-2:])
    outs = [_conv_norm_act(c, lat) for c, lat in zip(head.fpn.fpn_convs, laterals[:-1])] + [laterals[-1]]
    fused = _conv_norm_act(head.fpn.fpn_bottleneck, torch.cat([up(o, outs[0].shape[-2:]) for o in outs], 1))
    return F.conv2d(fused, head.classifier.weight, head.classifier.bias)


@pytest.mark.parametrize("image", [(45, 61), (16, 16), (64, 32)])
def test_default_model_computes_the_reference_formulation(image):
    """The default model (no fast paths) is, to fp32 rounding, the plain resize-concat-conv formulation."""
    model = tiny_model(norm="batchnorm").eval()
    randomize_bn(model)
    x = torch.randn(2, 3, *image)
    with torch.no_grad():
        levels = model.adapter(model.backbone_features(x))
        logits = _reference_head(model.head, levels)
        padded = [s * model.patch_size for s in levels[2].shape[-2:]]
        expected = F.interpolate(logits, size=padded, mode="bilinear", align_corners=False)[..., : image[0], : image[1]]
        assert (model.head(levels) - logits).abs().max() < 1e-5
        assert (model(x) - expected).abs().max() < 1e-5


def _pyramid_sizes(h, w):
    """Level sizes (strides 4, 8, 16, 32) that the SFP makes of an h x w token grid (stride 16)."""
    return [(4 * h, 4 * w), (2 * h, 2 * w), (h, w), (-(-h // 2), -(-w // 2))]


@given(grid=st.tuples(st.integers(1, 8), st.integers(1, 8)),
       in_channels=st.lists(st.integers(4, 16), min_size=4, max_size=4), hidden=st.integers(4, 16),
       num_classes=st.integers(1, 4))
@example(grid=(1, 1), in_channels=[4, 5, 6, 7], hidden=4, num_classes=1)
@example(grid=(5, 3), in_channels=[16, 4, 9, 13], hidden=11, num_classes=3)
def test_head_computes_the_reference_formulation(grid, in_channels, hidden, num_classes):
    """The head equals :func:`_reference_head` on any SFP-shaped pyramid (odd sizes, a 1 x 1 coarsest map)
    with any channel counts."""
    head = UperNetHead(in_channels, channels=hidden, num_classes=num_classes, norm="batchnorm").double().eval()
    randomize_bn(head)
    with torch.no_grad():
        head.classifier.weight.normal_()  # its init (std 0.01) would make every logit small enough to pass
        head.classifier.bias.normal_()
        features = [torch.randn(2, c, *s, dtype=torch.float64) for c, s in zip(in_channels, _pyramid_sizes(*grid))]
        assert torch.allclose(head(features), _reference_head(head, features), atol=1e-5)


@given(size=sizes, in_channels=st.integers(1, 8), channels=st.integers(1, 8), pool_scales=st.permutations([1, 2, 3, 6]))
@example(size=(1, 1), in_channels=3, channels=2, pool_scales=[1, 2, 3, 6])
@example(size=(5, 7), in_channels=3, channels=2, pool_scales=[6, 3, 1, 2])
def test_ppm_scale_1_branch_is_the_global_mean_through_its_conv(size, in_channels, channels, pool_scales):
    """The scale-1 branch, as the bottleneck gets it: the same value at every pixel, conv-BN-ReLU of the
    input's global mean."""
    ppm = PyramidPoolingModule(in_channels, channels, pool_scales, norm="batchnorm").double().eval()
    randomize_bn(ppm)
    bottleneck_inputs = []
    ppm.bottleneck.register_forward_pre_hook(lambda module, args: bottleneck_inputs.append(args[0]))
    x = torch.randn(2, in_channels, *size, dtype=torch.float64)
    k = pool_scales.index(1)
    with torch.no_grad():
        ppm(x)  # the bottleneck gets cat([x, p_s for s in pool_scales])
        branch = bottleneck_inputs[0][:, in_channels + k * channels : in_channels + (k + 1) * channels]
        by_hand = _conv_norm_act(ppm.stages[k], x.mean((2, 3), keepdim=True))
    assert branch.shape == (2, channels, *size)
    assert torch.allclose(branch, branch[..., :1, :1].expand_as(branch), atol=1e-5)
    assert torch.allclose(branch, by_hand.expand_as(branch), atol=1e-5)


@given(size=sizes, top_size=sizes, in_channels=st.integers(1, 8), channels=st.integers(1, 8))
@example(size=(7, 5), top_size=(1, 1), in_channels=3, channels=2)
def test_fpn_with_one_lower_level_is_the_hand_computation(size, top_size, in_channels, channels):
    """Two levels: lateral 1x1 + resized top, fpn 3x3, concat [level, resized top], bottleneck 3x3."""
    fpn = FPNFusion([in_channels], channels, norm="batchnorm").double().eval()
    randomize_bn(fpn)
    feature = torch.randn(2, in_channels, *size, dtype=torch.float64)
    top = torch.randn(2, channels, *top_size, dtype=torch.float64)
    top_up = F.interpolate(top, size=size, mode="bilinear", align_corners=False)
    with torch.no_grad():
        level = _conv_norm_act(fpn.fpn_convs[0], _conv_norm_act(fpn.lateral_convs[0], feature) + top_up)
        by_hand = _conv_norm_act(fpn.fpn_bottleneck, torch.cat([level, top_up], 1))
        assert torch.allclose(fpn([feature], top), by_hand, atol=1e-5)
