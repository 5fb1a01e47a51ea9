"""ONNX export: onnxruntime gives PyTorch's logits at the export size and, through the dynamic batch/H/W
axes, at other sizes (not multiples of the patch, another batch, the native pos-embed grid)."""
import json
import os
import sys

import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from upernet_vit import UperNetViT  # noqa: E402
from upernet_vit.cli import main  # noqa: E402
from upernet_vit.export import export_onnx  # noqa: E402
from upernet_vit.runs.record import RECORD_VERSION  # noqa: E402

ONE_BLOCK = dict(depth=1, embed_dim=32, num_heads=2)  # the exports' time grows with the graph: one block, 4 taps


def _model(backbone, size, **kwargs):
    """pool_scales (1, 3): the export's pooling paths (mean; uneven bins) in a smaller graph than (1, 2, 3, 6)."""
    return UperNetViT(backbone, size, num_classes=3, in_chans=1, hidden_size=16, feature_indices=[0, 0, 0, 0],
                      pool_scales=(1, 3), **kwargs).eval()


def _max_diff(session, model, shape):
    x = torch.randn(shape)
    with torch.no_grad():
        expected = model(x)
    (out,) = session.run(None, {"image": x.numpy()})
    assert out.shape == tuple(expected.shape)
    return float((torch.from_numpy(out) - expected).abs().max())


@pytest.mark.slow  # 13-15 s each on a 2-core CPU; .ci/run runs the slow tests too
@pytest.mark.parametrize(
    "backbone, size, kwargs",
    [
        ("vit_small_patch16_224", None, {}),
        # pos-embed "dino" mode (scale factor (grid + 0.1) / native); native grid 7 = 98 px, run below
        ("dinov2", "small", dict(img_size=98)),
        ("dinov3", "small", {}),  # RoPE, storage tokens
    ],
    ids=["timm-vit", "dinov2", "dinov3-rope"],
)
def test_dynamic_onnx_equals_pytorch_at_other_sizes(backbone, size, kwargs, tmp_path):
    model = _model(backbone, size, backbone_kwargs=dict(ONE_BLOCK, **kwargs))
    path = str(tmp_path / "model.onnx")
    diffs = export_onnx(model, path, 64, 64)  # checks the export size and one more itself
    assert len(diffs) == 2 and max(diffs.values()) < 1e-4
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    p = model.patch_size
    for shape in [(1, 1, 64, 64), (2, 1, 80, 48), (1, 1, 70, 90), (3, 1, 7 * p, 7 * p), (1, 1, p - 1, 5 * p + 3)]:
        assert _max_diff(session, model, shape) < 1e-4, shape


def test_export_raises_instead_of_writing_a_mismatching_file(tmp_path):
    model = _model("vit_small_patch16_224", None, backbone_kwargs=ONE_BLOCK)
    path = tmp_path / "model.onnx"
    with pytest.raises(RuntimeError, match="differs from PyTorch"):
        export_onnx(model, path, 48, 40, dynamic=False, atol=0.0)  # no float result is < 0
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="more than 2 patches"):
        export_onnx(model, path, 32, 64)  # a 2-patch example would fix the 1 px pyramid level


def test_missing_onnx_packages_name_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    with pytest.raises(ImportError, match=r'pip install -e "\.\[export\]" in the checkout'):
        export_onnx(_model("vit_small_patch16_224", None, backbone_kwargs=ONE_BLOCK), tmp_path / "m.onnx", 64, 64)


def test_cli_export_of_a_run_folder(tmp_path, capsys):
    model = _model("dinov2", "small", backbone_kwargs=ONE_BLOCK)
    run = tmp_path / "run"
    prep = {"mean": [0.5], "std": [0.25], "normalization": "preset", "label_values": [0, 1, 2], "patch_size": [42, 56],
            "intensity_scale": 255.0, "intensity_range": [0.0, 255.0]}
    model.preprocessing = prep
    model.save_pretrained(run / "checkpoint_best")
    out = str(tmp_path / "new" / "folder" / "model.onnx")  # the folder is created
    assert main(["export", str(run), "--checkpoint", "best", "--format", "onnx", "--output", out, "--static"]) == 0
    assert "wrote" in capsys.readouterr().out
    import onnx

    onnx_model = onnx.load(out)
    dims = [d.dim_value for d in onnx_model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 1, 42, 56]  # the training patch from preprocessing.json
    metadata = {p.key: p.value for p in onnx_model.metadata_props}
    stored = json.loads(metadata["upernet_vit.preprocessing"])  # the record in its current form
    assert stored == {**prep, "version": RECORD_VERSION, "label_names": None, "num_channels": None, "file_ending": None,
                      "slice_axis": None, "context_slices": 0, "channel_normalization": None}
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    assert _max_diff(session, model, (1, 1, 42, 56)) < 1e-4
    assert main(["export", str(tmp_path / "missing"), "--output", out]) == 2
