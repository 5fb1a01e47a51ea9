"""upernet_vit.fast.optimize: the specification of the opt-in fast paths. Whatever they swap in, state-dict
keys stay and outputs and gradients equal the reference model's within fp32 rounding.
(Speed and memory are measured in benchmarks/, never asserted here.)"""
import contextlib
import gc
import weakref

import pytest
import torch

from upernet_vit import FPNFusion, UperNetHead
from upernet_vit.fast import LeanFPNFusion, WinogradConv2d, optimize, split_conv
from helpers import grads, randomize_bn, tiny_model

FLAGS = [
    dict(channels_last=True, recompute_upsampled=False, winograd=False),
    dict(channels_last=False, recompute_upsampled=True, winograd=False),
    dict(channels_last=True, recompute_upsampled=True, winograd=False),  # the default
    dict(channels_last=True, recompute_upsampled=True, winograd=True),
    dict(channels_last=False, recompute_upsampled=False, winograd=True),
]


def force_winograd(module: torch.nn.Module) -> None:
    """Winograd on every map size (by default it skips maps too small to pay off)."""
    for m in module.modules():
        if isinstance(m, WinogradConv2d):
            m.min_size = m.min_size_train = 1


def _pair(**model_kwargs):
    torch.manual_seed(0)
    reference = tiny_model(**model_kwargs)
    randomize_bn(reference)
    fast = tiny_model(**model_kwargs)
    fast.load_state_dict(reference.state_dict())
    return reference, fast


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "+".join(k for k, v in f.items() if v) or "none")
def test_optimized_model_equals_the_reference(flags):
    reference, fast = _pair(norm="batchnorm", upsampler="progressive", aux_head=True, dropout=0.0)
    keys = list(fast.state_dict())
    assert optimize(fast, **flags) is fast
    force_winograd(fast)
    assert list(fast.state_dict()) == keys
    x = torch.randn(2, 3, 45, 61)
    reference.eval(), fast.eval()
    with torch.no_grad():
        for a, b in zip(reference(x, return_aux=True), fast(x, return_aux=True)):
            assert (a - b).abs().max() < 1e-5
    reference.train(), fast.train()
    for model in (reference, fast):
        model.zero_grad()
        logits, aux = model(x, return_aux=True)
        (logits.square().mean() + aux.square().mean()).backward()
    for (name, p), q in zip(reference.named_parameters(), fast.parameters()):
        assert (p.grad - q.grad).abs().max() < 1e-5, name


def test_the_defaults_are_the_measured_policy_for_the_device_and_mode():
    """``optimize(model)`` is what train and predict run: recompute_upsampled always, channels_last only
    for a model in eval mode on the CPU (it slowed CPU training; not yet measured on CUDA)."""
    def head_is_channels_last(model):
        return model.head.fpn.fpn_convs[0].conv.weight.is_contiguous(memory_format=torch.channels_last)

    trained, evaluated = optimize(tiny_model().train()), optimize(tiny_model().eval())
    assert type(trained.head.fpn) is type(evaluated.head.fpn) is LeanFPNFusion
    assert not head_is_channels_last(trained) and head_is_channels_last(evaluated)
    assert not any(isinstance(m, WinogradConv2d) for m in [*trained.modules(), *evaluated.modules()])


def test_flags_state_the_result_so_optimize_can_undo():
    model = tiny_model()
    fpn = model.head.fpn
    optimize(model, winograd=True, channels_last=True)
    assert type(fpn) is LeanFPNFusion and isinstance(fpn.fpn_bottleneck.conv, WinogradConv2d)
    assert model.head.fpn.fpn_convs[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    optimize(model, channels_last=False, recompute_upsampled=False, winograd=False)
    assert type(fpn) is FPNFusion
    assert not any(isinstance(m, WinogradConv2d) for m in model.modules())
    assert all(p.is_contiguous() for p in model.head.parameters())


def test_fuse_bn_keeps_outputs_and_needs_eval():
    model = tiny_model(norm="batchnorm", upsampler="progressive", aux_head=True).eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        before = model(x, return_aux=True)
        optimize(model, fuse_bn=True)
        after = model(x, return_aux=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    for a, b in zip(before, after):
        assert (a - b).abs().max() < 1e-4
    with pytest.raises(RuntimeError, match="eval"):
        optimize(tiny_model(norm="batchnorm").train(), fuse_bn=True)


def test_head_alone_and_bad_modules():
    head = UperNetHead([8] * 4, channels=8, num_classes=2)
    assert type(optimize(head).fpn) is LeanFPNFusion
    with pytest.raises(TypeError, match="UperNetViT or an UperNetHead"):
        optimize(torch.nn.Conv2d(3, 3, 3))

    class CustomFPN(FPNFusion):
        pass

    head.fpn.__class__ = CustomFPN
    with pytest.raises(TypeError, match="CustomFPN.*recompute_upsampled=False"):
        optimize(head)
    optimize(head, recompute_upsampled=False)  # channels_last only: fine
    assert type(head.fpn) is CustomFPN


def test_split_conv_equals_the_concat_conv():
    conv = torch.nn.Conv2d(12, 8, 3, padding=1)
    parts = [torch.randn(2, c, 9, 14, requires_grad=True) for c in (4, 3, 5)]
    split, concat = split_conv(conv, parts), conv(torch.cat(parts, 1))
    assert (split - concat).abs().max() < 1e-5
    for a, b in zip(grads(split, parts + [conv.weight]), grads(concat, parts + [conv.weight])):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def _recompute_check(monkeypatch, **flags):
    """One head step; returns (upsampled maps still alive after forward, gradients)."""
    import upernet_vit.fast.fpn as fast_fpn
    import upernet_vit.fast.winograd as wg

    torch.manual_seed(0)
    head = optimize(UperNetHead([16] * 4, channels=8, num_classes=3, norm="batchnorm", dropout=0.0), **flags)
    force_winograd(head)
    feats = [torch.randn(2, 16, s, s, generator=torch.Generator().manual_seed(s)).requires_grad_() for s in (24, 12, 6, 3)]
    resized = []

    def tracking(original):
        def resize(x, size):
            out = original(x, size)
            if out is not x and tuple(out.shape[-2:]) == (24, 24):
                resized.append(weakref.ref(out))
            return out
        return resize

    for module in (fast_fpn, wg):  # the fast fuse step's resizes (the reference's are in fpn.py)
        monkeypatch.setattr(module, "resize", tracking(module.resize))
    out = head(feats)
    gc.collect()
    alive = sum(r() is not None for r in resized)
    assert len(resized) == (3 if type(head.fpn) is LeanFPNFusion else 0)  # the 3 upsampled levels
    out.square().mean().backward()
    return alive, [p.grad for p in head.parameters()] + [f.grad for f in feats]


def test_upsampled_levels_are_recomputed_not_kept(monkeypatch):
    """Split and Winograd paths free the upsampled maps after forward (the split conv without the hooks
    keeps all 3, as each partial conv saves its input) and give the reference's gradients (bit-identical
    to the kept form: the hooks only change what is stored)."""
    import upernet_vit.fast.fpn as fast_fpn

    _, reference = _recompute_check(monkeypatch, recompute_upsampled=False)
    alive_split, split = _recompute_check(monkeypatch)
    alive_winograd, winograd = _recompute_check(monkeypatch, winograd=True)
    monkeypatch.setattr(fast_fpn, "recompute_resizes", lambda pairs: contextlib.nullcontext())
    alive_kept, kept = _recompute_check(monkeypatch)
    assert (alive_split, alive_winograd, alive_kept) == (0, 0, 3)
    for r, a, b, c in zip(reference, split, winograd, kept):
        assert torch.equal(a, c)
        assert (a - r).abs().max() < 1e-5 and (b - r).abs().max() < 1e-5


def test_compile_and_export_see_a_plain_conv(monkeypatch):
    """Under torch.compile/export the Winograd module takes the direct path: no graph break, no
    shape-specialized Python tile loop in an exported graph."""
    import upernet_vit.fast.winograd as wg

    head = optimize(UperNetHead([8, 8, 8, 8], channels=8, num_classes=2, dropout=0.0), winograd=True).eval()
    force_winograd(head)
    feats = [torch.randn(1, 8, s, s) for s in (16, 8, 4, 2)]
    with torch.no_grad():
        eager = head(feats)

    def traced_winograd(*args):
        raise AssertionError("the Winograd path was traced")

    monkeypatch.setattr(wg._Winograd3x3, "apply", traced_winograd)
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert (compiled(feats) - eager).abs().max() < 1e-5
        assert (torch.export.export(head, (feats,)).module()(feats) - eager).abs().max() < 1e-5
