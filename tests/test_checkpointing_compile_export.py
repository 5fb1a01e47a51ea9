"""Gradient checkpointing, torch.compile and torch.export of the reference model keep its math: the same
gradients with checkpointing, one graph (no breaks) that computes the eager outputs, an exported program
that does too. (The opt-in fast paths: test_fast.py. ONNX and ExportedProgram files: test_export_*.py.
Speed and memory: benchmarks/.)"""
import pytest
import torch

from upernet_vit import UperNetViT
from helpers import TINY, tiny_model


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


@pytest.mark.slow  # 10-13 s each on a 2-core CPU; .ci/run runs the slow tests too
@pytest.mark.parametrize("backbone, size", [("vit_small_patch16_224", None), ("dinov2", "small"), ("dinov3", "small")])
def test_compiles_as_one_graph(backbone, size):
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward without codegen."""
    model = UperNetViT(backbone, size, 3, hidden_size=16, upsampler="progressive", backbone_kwargs=TINY)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 3, 50, 70)  # not a multiple of the patch: the padding path too
    model.eval()
    with torch.no_grad():
        assert (compiled(x) - model(x)).abs().max() < 1e-5
    model.train()
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_torch_export_of_the_eval_model():
    model = UperNetViT("dinov2", "small", 3, in_chans=1, hidden_size=16, backbone_kwargs=TINY).eval()
    x = torch.randn(1, 1, 112, 140)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert (exported.module()(x) - model(x)).abs().max() < 1e-5

