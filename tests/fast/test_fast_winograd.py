"""The Winograd F(2x2, 3x3) kernel of upernet_vit.fast keeps the math: values and gradients, any size."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import upernet_vit.fast.winograd as winograd
from upernet_vit.fast.winograd import WinogradConv2d, filter_transform, filter_transform_adjoint, winograd_conv3x3
from helpers import grads as _grads


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 2),
    parts=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    c_out=st.integers(1, 6),
    height=st.integers(1, 13),
    width=st.integers(1, 13),
    tile_bytes=st.sampled_from([1, 3000, 1 << 30]),  # one tile row per chunk, a few, everything at once
)
def test_equals_direct_conv_forward_and_backward(batch, parts, c_out, height, width, tile_bytes):
    """fp64 so that any mistake (a wrong transform, a tile off by one at an odd edge) shows above 1e-10."""
    old = winograd.TILE_BYTES
    winograd.TILE_BYTES = tile_bytes
    try:
        gen = torch.Generator().manual_seed(height * 100 + width)
        xs = [torch.randn(batch, c, height, width, dtype=torch.float64, generator=gen).requires_grad_() for c in parts]
        w = torch.randn(c_out, sum(parts), 3, 3, dtype=torch.float64, generator=gen).requires_grad_()
        b = torch.randn(c_out, dtype=torch.float64, generator=gen).requires_grad_()
        ours = winograd_conv3x3(xs if len(xs) > 1 else xs[0], w, b)
        ref = F.conv2d(torch.cat(xs, 1), w, b, padding=1)
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max() < 1e-10
        for a, r in zip(_grads(ours, [*xs, w, b]), _grads(ref, [*xs, w, b])):
            assert a.shape == r.shape and (a - r).abs().max() < 1e-10
    finally:
        winograd.TILE_BYTES = old


def test_gradcheck():
    x = torch.randn(1, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(winograd_conv3x3, (x, w))


def test_filter_transform_adjoint_is_its_transpose():
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    u = torch.randn(16, 3, 4, dtype=torch.float64)
    assert torch.allclose((filter_transform(w) * u).sum(), (w * filter_transform_adjoint(u)).sum())


def test_fp32_error_is_no_worse_than_the_direct_conv():
    """Against an fp64 reference, on a head-like shape (many channels, 2 chunks)."""
    x = torch.randn(1, 256, 40, 40).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 256, 3, 3) * 0.05
    exact = F.conv2d(x.double(), w.double(), padding=1)
    err_winograd = (winograd_conv3x3(x, w).double() - exact).abs().max()
    err_direct = (F.conv2d(x, w, padding=1).double() - exact).abs().max()
    assert err_winograd < 2 * err_direct + 1e-6


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"sum\(C_i\) = C_in"):
        winograd_conv3x3(torch.randn(1, 3, 8, 8), torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="one batch and size"):
        winograd_conv3x3([torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 9)], torch.randn(2, 4, 3, 3))


def test_module_is_a_drop_in_conv2d():
    plain = torch.nn.Conv2d(4, 6, 3, padding=1)
    conv = WinogradConv2d.convert(torch.nn.Conv2d(4, 6, 3, padding=1))
    conv.load_state_dict(plain.state_dict())
    assert conv.state_dict().keys() == plain.state_dict().keys()
    with pytest.raises(ValueError, match="3x3, stride 1, padding 1"):
        WinogradConv2d.convert(torch.nn.Conv2d(4, 6, 3, padding=1, stride=2))
    x = torch.randn(2, 4, 40, 36)
    with torch.no_grad():
        assert conv.use_winograd(x)
        assert (conv(x) - plain(x)).abs().max() < 1e-5
        # where the direct conv is the better choice or the only correct one, it is used
        assert not conv.use_winograd(torch.randn(2, 4, 16, 16))  # below min_size
        assert not conv.use_winograd(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not conv.use_winograd(x)
            assert conv(x).dtype == torch.bfloat16
    # training (autograd records): only from min_size_train pixels
    assert not conv.use_winograd(x)
    assert conv.use_winograd(torch.randn(2, 4, 96, 96))


@pytest.mark.parametrize("size", [(12, 9), (7, 7)])
def test_resize_then_conv_form_equals_resize_concat_conv(size):
    """``size=``: maps of several sizes, each bilinearly resized to ``size``, then the conv of their concat;
    fp64 values and gradients against the direct computation (incl. a map already at ``size``)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, size[0], size[1]), (2, 6, 5), (4, 3, 2), (1, 1, 1)]
    xs = [torch.randn(2, c, h, w, dtype=torch.float64, generator=gen).requires_grad_() for c, h, w in shapes]
    w = torch.randn(5, 10, 3, 3, dtype=torch.float64, generator=gen).requires_grad_()
    ours = winograd_conv3x3(xs, w, size=size)
    up = [F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in xs]
    ref = F.conv2d(torch.cat(up, 1), w, padding=1)
    assert (ours - ref).abs().max() < 1e-10
    for a, r in zip(_grads(ours, [*xs, w]), _grads(ref, [*xs, w])):
        assert a.shape == r.shape and (a - r).abs().max() < 1e-10
