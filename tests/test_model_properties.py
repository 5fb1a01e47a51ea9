"""Property tests: any batch, size, channel count, class count, patch size; train and eval."""
import functools

import torch
from hypothesis import given
from hypothesis import strategies as st

from upernet_vit import UperNetViT
from helpers import TINY

PRESET_BY_PATCH = {14: ("dinov2", "small"), 16: ("dinov3", "small")}


@functools.lru_cache(maxsize=None)
def _model(patch: int, in_chans: int, num_classes: int) -> UperNetViT:
    torch.manual_seed(patch * 100 + in_chans * 10 + num_classes)
    backbone, size = PRESET_BY_PATCH[patch]
    return UperNetViT(
        backbone, size, num_classes, in_chans=in_chans, hidden_size=16, backbone_kwargs=TINY
    )


@given(
    batch=st.integers(1, 3),
    height=st.integers(1, 100),
    width=st.integers(1, 100),
    in_chans=st.integers(1, 4),
    num_classes=st.integers(1, 5),
    patch=st.sampled_from([14, 16]),
    train=st.booleans(),
)
def test_output_shape_finite_and_gradients(batch, height, width, in_chans, num_classes, patch, train):
    model = _model(patch, in_chans, num_classes)
    model.train(train)
    x = torch.randn(batch, in_chans, height, width, requires_grad=train)
    if not train:
        with torch.no_grad():
            out = model(x)
        assert out.shape == (batch, num_classes, height, width)
        assert torch.isfinite(out).all()
        return
    model.zero_grad(set_to_none=True)
    out = model(x)
    assert out.shape == (batch, num_classes, height, width)
    assert torch.isfinite(out).all()
    # a loss that weights every output pixel differently, so no gradient cancels by symmetry
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
