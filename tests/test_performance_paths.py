"""Performance code paths keep the math: BN fusion, gradient checkpointing, torch.compile without graph
breaks. (Speed and memory are measured in benchmarks/, never asserted here.)"""
import pytest
import torch

from upernet_vit import UperNetViT
from helpers import TINY, tiny_model


def _randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def test_fused_model_equals_unfused():
    model = tiny_model(norm="batchnorm", upsampler="progressive", aux_head=True).eval()
    _randomize_bn(model)
    x = torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        before = model(x, return_aux=True)
        model.fuse()
        after = model(x, return_aux=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    for a, b in zip(before, after):
        assert (a - b).abs().max() < 1e-4
    with pytest.raises(RuntimeError, match="eval"):
        tiny_model(norm="batchnorm").train().fuse()


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = tiny_model()
    torch.manual_seed(0)
    checkpointed = tiny_model(gradient_checkpointing=True)
    assert checkpointed.backbone.vit.grad_checkpointing and checkpointed.to_config().model.gradient_checkpointing
    for model in (plain, checkpointed):
        model.train()
        torch.manual_seed(1)  # the same dropout masks
        model(torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(2))).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


@pytest.mark.parametrize("backbone, size", [("vit_small_patch16_224", None), ("dinov2", "small"), ("dinov3", "small")])
def test_compiles_as_one_graph(backbone, size):
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward without codegen."""
    model = UperNetViT(backbone, size, 3, decoder_channels=16, upsampler="progressive", backbone_kwargs=TINY)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 3, 50, 70)  # not a multiple of the patch: the padding path too
    model.eval()
    with torch.no_grad():
        assert (compiled(x) - model(x)).abs().max() < 1e-5
    model.train()
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_torch_export_of_the_eval_model():
    model = UperNetViT("dinov2", "small", 3, in_chans=1, decoder_channels=16, backbone_kwargs=TINY).eval()
    x = torch.randn(1, 1, 112, 140)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert (exported.module()(x) - model(x)).abs().max() < 1e-5



def _recompute_check(monkeypatch, winograd):
    """Run a head step; returns (upsampled maps still alive after forward, gradients)."""
    import gc
    import weakref

    import upernet_vit.layers as layers
    import upernet_vit.winograd as wg
    from upernet_vit import UperNetHead

    torch.manual_seed(0)
    head = UperNetHead([16] * 4, channels=8, num_classes=3, norm="batchnorm", dropout=0.0, winograd=winograd)
    for m in head.modules():
        if hasattr(m, "min_size"):
            m.min_size = m.min_size_train = 1
    feats = [torch.randn(2, 16, s, s, generator=torch.Generator().manual_seed(s)).requires_grad_() for s in (24, 12, 6, 3)]
    resized = []

    def tracking(original):
        def resize(x, size):
            out = original(x, size)
            if out is not x and tuple(out.shape[-2:]) == (24, 24):
                resized.append(weakref.ref(out))
            return out
        return resize

    monkeypatch.setattr(layers, "resize", tracking(layers.resize))
    monkeypatch.setattr(wg, "resize", tracking(wg.resize))
    out = head(feats)
    gc.collect()
    alive = sum(r() is not None for r in resized)
    assert len(resized) == 3  # the 3 upsampled levels (the top-down resizes stop at smaller sizes)
    out.square().mean().backward()
    return alive, [p.grad for p in head.parameters()] + [f.grad for f in feats]


def test_head_recomputes_upsampled_levels_instead_of_saving_them(monkeypatch):
    """Direct and Winograd paths: the same gradients as keeping the upsampled maps, which are freed after
    forward instead of kept for backward."""
    import contextlib

    import upernet_vit.layers as layers

    alive_direct, direct = _recompute_check(monkeypatch, winograd=False)
    alive_winograd, winograd = _recompute_check(monkeypatch, winograd=True)
    monkeypatch.setattr(layers, "recompute_resizes", lambda pairs: contextlib.nullcontext())
    alive_kept, kept = _recompute_check(monkeypatch, winograd=False)
    assert (alive_direct, alive_winograd, alive_kept) == (0, 0, 3)
    for a, b, c in zip(direct, winograd, kept):
        assert torch.equal(a, c)
        assert (b - c).abs().max() < 1e-5
