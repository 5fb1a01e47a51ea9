"""Weight compatibility with HuggingFace transformers' and mmsegmentation's UperNet heads."""
import pytest
import torch

from upernet_vit import UperNetHead, from_hf_upernet, from_mmseg_upernet
from helpers import randomize_bn

transformers = pytest.importorskip("transformers")
from transformers import UperNetConfig  # noqa: E402
from transformers.models.upernet.modeling_upernet import UperNetFCNHead  # noqa: E402
from transformers.models.upernet.modeling_upernet import UperNetHead as HFUperNetHead  # noqa: E402

IN_CHANNELS = [12, 16, 20, 24]


def _hf_head(num_labels=5, hidden=32, pool_scales=(1, 2, 3, 6)):
    config = UperNetConfig(hidden_size=hidden, pool_scales=list(pool_scales), num_labels=num_labels)
    head = HFUperNetHead(config, in_channels=IN_CHANNELS)
    randomize_bn(head)
    return head.eval(), config


def _ours(num_labels=5, hidden=32, pool_scales=(1, 2, 3, 6), aux_head=False):
    return UperNetHead(
        IN_CHANNELS, channels=hidden, num_classes=num_labels, pool_scales=pool_scales, norm="batchnorm",
        aux_head=aux_head,
    ).eval()


SIZES = [
    [(32, 32), (16, 16), (8, 8), (4, 4)],
    [(29, 19), (15, 10), (8, 5), (4, 3)],  # odd sizes, as from odd token grids
    [(4, 4), (2, 2), (1, 1), (1, 1)],  # 1x1 coarsest map
    [(9, 9), (5, 5), (3, 3), (2, 2)],
]


@pytest.mark.parametrize("sizes", SIZES)
def test_hf_head_parity(sizes):
    hf, _ = _hf_head()
    ours = _ours()
    ours.load_state_dict(from_hf_upernet(hf.state_dict()), strict=True)
    feats = [torch.randn(2, c, *s) for c, s in zip(IN_CHANNELS, sizes)]
    with torch.no_grad():
        diff = (hf(feats) - ours(feats)).abs().max().item()
    assert diff < 1e-5, diff


def test_hf_full_model_keys_with_aux_head():
    hf, config = _hf_head()
    aux = UperNetFCNHead(config, in_channels=IN_CHANNELS, in_index=2)
    randomize_bn(aux)
    aux.eval()
    state = {f"decode_head.{k}": v for k, v in hf.state_dict().items()}
    state.update({f"auxiliary_head.{k}": v for k, v in aux.state_dict().items()})
    state["backbone.embeddings.weight"] = torch.zeros(1)  # ignored
    ours = UperNetHead(
        IN_CHANNELS, channels=32, num_classes=5, norm="batchnorm", aux_head=True,
        aux_channels=config.auxiliary_channels,
    ).eval()
    ours.load_state_dict(from_hf_upernet(state), strict=True)
    feats = [torch.randn(1, c, s, s) for c, s in zip(IN_CHANNELS, (16, 8, 4, 2))]
    with torch.no_grad():
        logits, aux_logits = ours(feats, return_aux=True)
        assert (logits - hf(feats)).abs().max() < 1e-5
        assert (aux_logits - aux(feats)).abs().max() < 1e-5


def _hf_to_mmseg_names(key: str) -> str:
    return key.replace("batch_norm", "bn").replace("classifier", "conv_seg")


# Key names as mmsegmentation's UPerHead/FCNHead state dict writes them (ConvModule: conv + bn).
MMSEG_KEYS_SAMPLE = {
    "decode_head.conv_seg.weight",
    "decode_head.conv_seg.bias",
    "decode_head.psp_modules.0.1.conv.weight",
    "decode_head.psp_modules.3.1.bn.running_var",
    "decode_head.bottleneck.conv.weight",
    "decode_head.bottleneck.bn.num_batches_tracked",
    "decode_head.lateral_convs.2.conv.weight",
    "decode_head.fpn_convs.0.bn.weight",
    "decode_head.fpn_bottleneck.conv.weight",
    "decode_head.fpn_bottleneck.bn.bias",
    "auxiliary_head.convs.0.conv.weight",
    "auxiliary_head.convs.0.bn.running_mean",
    "auxiliary_head.conv_seg.weight",
}


def test_mmseg_key_mapping_and_parity():
    hf, config = _hf_head()
    aux = UperNetFCNHead(config, in_channels=IN_CHANNELS, in_index=2).eval()
    state = {f"decode_head.{_hf_to_mmseg_names(k)}": v for k, v in hf.state_dict().items()}
    state.update({f"auxiliary_head.{_hf_to_mmseg_names(k)}": v for k, v in aux.state_dict().items()})
    state["backbone.blocks.0.attn.qkv.weight"] = torch.zeros(1)
    state["neck.fpn1.0.weight"] = torch.zeros(1)
    assert MMSEG_KEYS_SAMPLE <= set(state)
    converted = from_mmseg_upernet(state)
    ours = UperNetHead(IN_CHANNELS, channels=32, num_classes=5, norm="batchnorm", aux_head=True).eval()
    ours.load_state_dict(converted, strict=True)
    assert converted["classifier.weight"] is state["decode_head.conv_seg.weight"]
    assert converted["ppm.stages.3.norm.running_var"] is state["decode_head.psp_modules.3.1.bn.running_var"]
    assert converted["aux_head.classifier.weight"] is state["auxiliary_head.conv_seg.weight"]
    feats = [torch.randn(1, c, s, s) for c, s in zip(IN_CHANNELS, (16, 8, 4, 1))]
    with torch.no_grad():
        assert (ours(feats) - hf(feats)).abs().max() < 1e-5


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match="conv_cat"):
        from_mmseg_upernet({"auxiliary_head.conv_cat.conv.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="backbone.patch_embed"):
        from_hf_upernet({"backbone.patch_embed.proj.weight": torch.zeros(1)})  # no head prefix: all unknown
    with pytest.raises(ValueError, match="no HuggingFace UperNet head keys"):
        from_hf_upernet({})


def _mmseg_feature2pyramid(d):
    """mmsegmentation's ``Feature2Pyramid`` (rescales 4, 2, 1, 0.5; BN), its module tree written out."""
    neck = torch.nn.Module()
    neck.upsample_4x = torch.nn.Sequential(torch.nn.ConvTranspose2d(d, d, 2, 2), torch.nn.BatchNorm2d(d),
                                           torch.nn.GELU(), torch.nn.ConvTranspose2d(d, d, 2, 2))
    neck.upsample_2x = torch.nn.Sequential(torch.nn.ConvTranspose2d(d, d, 2, 2))
    neck.downsample_2x = torch.nn.MaxPool2d(2, 2)
    return neck


def test_mmseg_neck_loads_into_the_simple_pyramid():
    from upernet_vit import from_mmseg_neck
    from upernet_vit.vit_adapter import SimpleFeaturePyramid

    torch.manual_seed(0)
    neck = _mmseg_feature2pyramid(16)
    randomize_bn(neck)
    segmentor = {f"neck.{k}": v for k, v in neck.state_dict().items()}
    segmentor["backbone.cls_token"] = torch.zeros(1, 1, 16)  # the rest of a segmentor is left alone
    ours = SimpleFeaturePyramid(16, norm="batchnorm")
    ours.load_state_dict(from_mmseg_neck(segmentor))  # strict: every key of ours is filled
    neck.eval(), ours.eval()
    maps = [torch.randn(2, 16, 6, 8) for _ in range(4)]
    expected = [neck.upsample_4x(maps[0]), neck.upsample_2x(maps[1]), maps[2], neck.downsample_2x(maps[3])]
    for got, want in zip(ours(maps), expected):
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="no mmsegmentation Feature2Pyramid 4x level"):
        from_mmseg_neck({k: v for k, v in segmentor.items() if "upsample_4x" not in k})
    with pytest.raises(ValueError, match="neck key 'upsample_8x.0.weight'"):
        from_mmseg_neck({**segmentor, "neck.upsample_8x.0.weight": torch.zeros(1)})
