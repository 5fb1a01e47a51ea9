"""Shared test helpers (imported as a plain module: pytest puts tests/ on sys.path)."""
import torch

from upernet_vit import UperNetViT

TINY = dict(depth=4, embed_dim=32, num_heads=2)


def tiny_model(**overrides) -> UperNetViT:
    """A depth-4, width-32 ViT with a 32-channel head: fast enough for property tests."""
    kwargs = dict(
        backbone="vit_small_patch16_224",
        num_classes=3,
        in_chans=3,
        decoder_channels=32,
        backbone_kwargs=dict(TINY),
    )
    kwargs.update(overrides)
    return UperNetViT(**kwargs)


def randomize_bn(module: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial BN statistics and affine params, so a wrong mapping or fold cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))


def grads(y: torch.Tensor, inputs, seed: int = 0):
    """Gradients of a random projection of ``y`` (no gradient cancels by symmetry)."""
    g = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((y * g).sum(), inputs)
