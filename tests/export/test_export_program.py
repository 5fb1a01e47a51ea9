"""torch.export with dynamic batch/H/W: the export formulations equal the eager steps, the program equals
the eager model at sizes other than the example's, and the model gets its own classes back."""
import pytest
import torch
import torch.nn.functional as F

from upernet_vit import PyramidPoolingModule, UperNetViT
from upernet_vit.backbones.pos_embed import resample_patch_pos_embed
from upernet_vit.export import export_formulations, export_program
from upernet_vit.export.formulations import (
    adaptive_avg_pool2d_any_size, pad_to_multiple_any_size, resample_pos_embed_any_size,
)
from upernet_vit.model import pad_to_multiple

ONE_BLOCK = dict(depth=1, embed_dim=32, num_heads=2)


def test_exportable_adaptive_pool_equals_torch():
    """Averaging matrices from the run-time size match torch's bins at every size."""
    for h in range(1, 15):
        for w in (1, 2, 5, 7, 12, 13):
            x = torch.randn(2, 3, h, w)
            for scale in (1, 2, 3, 6):
                expected = F.adaptive_avg_pool2d(x, scale)
                assert torch.allclose(adaptive_avg_pool2d_any_size(x, scale), expected, atol=1e-6), (h, w, scale)


@pytest.mark.parametrize("mode", ["dino", "mae"])
def test_exportable_pos_embed_resampling_equals_eager(mode):
    """"dino": bicubic weights from the run-time grid match F.interpolate by scale factor; both modes are
    the identity at the native grid, where eager skips the resampling."""
    for native in (7, 14):
        pos = torch.randn(1, native * native, 8) * 0.02  # the scale of trained / timm-initialized embeddings
        for grid in [(1, 1), (3, 9), (native, native), (native, 5), (20, 37)]:
            eager = resample_patch_pos_embed(pos, grid, mode)
            assert torch.allclose(resample_pos_embed_any_size(pos, grid, mode), eager, atol=1e-6), (native, grid)


@pytest.mark.parametrize("size", [(16, 16), (17, 30), (5, 40), (1, 1)])
def test_exportable_pad_equals_eager(size):
    x = torch.randn(1, 2, *size)
    assert torch.equal(pad_to_multiple_any_size(x, 16), pad_to_multiple(x, 16))


@pytest.mark.parametrize(
    "backbone, size, kwargs",
    [("vit_small_patch16_224", None, {}), ("dinov2", "small", dict(img_size=98)), ("retfound", None, {})],
    ids=["timm-vit", "dinov2-dino-rule", "retfound-mae-rule"],
)
def test_dynamic_program_equals_eager_at_other_sizes(backbone, size, kwargs):
    model = UperNetViT(backbone, size, 3, hidden_size=16, feature_indices=[0, 0, 0, 0], pool_scales=(1, 3),
                       backbone_kwargs=dict(ONE_BLOCK, **kwargs)).eval()
    p = model.patch_size
    program = export_program(model, torch.randn(2, 3, 4 * p, 5 * p))
    assert type(model) is UperNetViT and type(model.head.ppm) is PyramidPoolingModule  # classes restored
    for shape in [(1, 3, 7 * p, 7 * p), (3, 3, 3 * p + 5, 6 * p - 1)]:
        x = torch.randn(shape)
        with torch.no_grad():
            assert (program.module()(x) - model(x)).abs().max() < 1e-4, shape


def test_formulations_are_swapped_only_inside_the_block():
    model = UperNetViT("dinov2", "small", 2, hidden_size=8, feature_indices=[0, 0, 0, 0], backbone_kwargs=ONE_BLOCK)
    classes = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(RuntimeError, match="inside"):
        with export_formulations(model):
            assert type(model).__name__ == "ExportableUperNetViT" and isinstance(model, UperNetViT)
            assert type(model.head.ppm).__name__ == "ExportablePyramidPoolingModule"
            raise RuntimeError("inside")
    assert {name: type(m) for name, m in model.named_modules()} == classes
