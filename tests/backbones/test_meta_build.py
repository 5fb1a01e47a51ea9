"""Issue 18, part 1: a backbone stored in bfloat16 is built on the meta device and filled straight from its
weights file (official layouts, local timm files, timm tags), equal to the float32 load cast to bfloat16, and
without a float32 copy in memory; ``from_pretrained`` builds a saved model the same way."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from upernet_vit import UperNetViT
from upernet_vit.backbones import factory
from upernet_vit.backbones.meta import build_on_meta, check_materialized
from helpers import REPO_ROOT
from official_reference import ReferenceViT
from test_official_checkpoints import TAPS, _dinov2_training, _dinov3_ref, _hub, _mae, _timm_file

TINY = dict(depth=4, embed_dim=32, num_heads=2)
ROOT = REPO_ROOT


def _official(style, make_file, **kw):
    def write(path):
        torch.manual_seed(0)
        ref = _dinov3_ref(zero_qv_bias=True) if style == "dinov3" else ReferenceViT(style, depth=4, heads=2, **kw)
        torch.save(make_file(ref.eval()), path)
    return write


def _timm_safetensors(path):
    torch.manual_seed(0)
    donor = UperNetViT("vit_small_patch16_224", None, 2, hidden_size=8, backbone_kwargs=TINY)
    _timm_file(donor, path)


def _legacy_pickle(path):  # torch's pre-1.6 format: not a zip, so read whole rather than memory-mapped
    torch.manual_seed(0)
    ref = ReferenceViT("dinov2", depth=4, heads=2, dim=32, patch=14, img_size=518)
    torch.save(ref.state_dict(), path, _use_new_zipfile_serialization=False)


# (id, backbone, size, file name, writer)
FILES = [
    ("dinov2-hub", "dinov2", "small", "w.pth", _official("dinov2", _hub, dim=32, patch=14, img_size=518)),
    ("dinov2-training", "dinov2", "base", "w.pth", _official("dinov2", _dinov2_training, dim=32, patch=14, img_size=518)),
    ("dinov3", "dinov3", "base", "w.pth", _official("dinov3", _hub)),
    ("retfound-mae", "retfound", "large", "w.pth", _official("mae", _mae, dim=32, patch=16, img_size=224)),
    ("timm-safetensors", "vit_small_patch16_224", None, "w.safetensors", _timm_safetensors),
    ("legacy-pickle", "dinov2", "small", "w.pth", _legacy_pickle),
]


@pytest.fixture
def meta_builds(monkeypatch):
    """How many backbones were built through build_on_meta."""
    calls = []

    def counting(dtype=None):
        calls.append(dtype)
        return build_on_meta(dtype)

    monkeypatch.setattr(factory, "build_on_meta", counting)
    return calls


def _assert_same_backbone(stored: UperNetViT, cast: UperNetViT) -> None:
    cast.backbone.to(torch.bfloat16)
    ours, want = stored.backbone.state_dict(), cast.backbone.state_dict()
    assert ours.keys() == want.keys()
    for key in want:
        assert ours[key].dtype == want[key].dtype and torch.equal(ours[key], want[key]), key
    assert not any(p.is_meta for p in stored.parameters())
    x = torch.randn(2, 3, stored.patch_size * 5, stored.patch_size * 7)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(stored.backbone_features(x), cast.backbone_features(x)))


@pytest.mark.parametrize("case", FILES, ids=[c[0] for c in FILES])
def test_a_bfloat16_backbone_filled_from_its_file_equals_the_float32_load_cast(tmp_path, meta_builds, case):
    _, backbone, size, name, write = case
    path = str(tmp_path / name)
    write(path)
    options = dict(hidden_size=8, feature_indices=TAPS, checkpoint_path=path, backbone_kwargs=TINY)
    cast = UperNetViT(backbone, size, 2, **options).eval()
    assert meta_builds == []  # float32: built as always
    stored = UperNetViT(backbone, size, 2, backbone_dtype="bfloat16", freeze_backbone=True, **options).eval()
    assert meta_builds == [torch.bfloat16]
    assert {p.dtype for p in stored.backbone.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in stored.head.parameters()} == {torch.float32}
    _assert_same_backbone(stored, cast)


@pytest.mark.parametrize("preset, size", [("dinov2", "small"), ("dinov3", "base")])
def test_a_bfloat16_backbone_loaded_by_timm_tag_equals_the_float32_load_cast(tmp_path, meta_builds, preset, size):
    """timm's own loader (pretrained=True) fills the meta-built backbone; DINOv3's periods keep their rule."""
    torch.manual_seed(0)
    donor = UperNetViT(preset, size, 2, hidden_size=8, feature_indices=TAPS, backbone_kwargs=TINY)
    kwargs = dict(TINY, pretrained_cfg_overlay=_timm_file(donor, tmp_path / "model.safetensors"))
    cast = UperNetViT(preset, size, 2, pretrained=True, hidden_size=8, feature_indices=TAPS, backbone_kwargs=kwargs)
    stored = UperNetViT(preset, size, 2, pretrained=True, hidden_size=8, feature_indices=TAPS,
                        backbone_kwargs=kwargs, backbone_dtype="bfloat16", freeze_backbone=True)
    assert meta_builds == [torch.bfloat16]
    _assert_same_backbone(stored.eval(), cast.eval())


def test_without_weights_to_load_a_bfloat16_backbone_is_built_and_cast(meta_builds):
    torch.manual_seed(0)
    stored = UperNetViT("vit_small_patch16_224", None, 2, hidden_size=8, backbone_kwargs=TINY, backbone_dtype="bfloat16", freeze_backbone=True)
    torch.manual_seed(0)
    cast = UperNetViT("vit_small_patch16_224", None, 2, hidden_size=8, backbone_kwargs=TINY)
    assert meta_builds == []  # random initialization needs real tensors
    _assert_same_backbone(stored.eval(), cast.eval())


def test_from_pretrained_builds_on_meta_and_fills_from_model_safetensors(tmp_path):
    """A LoRA model with a bfloat16 backbone comes back equal, its adapters float32 and trainable."""
    torch.manual_seed(0)
    model = UperNetViT("vit_small_patch16_224", None, 3, hidden_size=8, backbone_kwargs=TINY, backbone_dtype="bfloat16", freeze_backbone=True)
    model.enable_lora(rank=2)
    with torch.no_grad():  # LoRA's B starts at zero: give the adapters a visible effect
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    model.save_pretrained(tmp_path / "m")
    loaded = UperNetViT.from_pretrained(tmp_path / "m")
    assert loaded.lora_enabled and not any(p.is_meta for p in loaded.parameters())
    trainable = {n: p.dtype for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n and d == torch.float32 for n, d in trainable.items())
    x = torch.randn(1, 3, 48, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_parameters_no_file_filled_are_named():
    with build_on_meta(torch.bfloat16):
        layer = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        layer.load_state_dict({"0.weight": torch.ones(4, 4), "0.bias": torch.zeros(4)}, strict=False)
    assert layer[0].weight.dtype == torch.bfloat16 and torch.equal(layer[0].weight, torch.ones(4, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"w.pth holds no weights for 2 parameter\(s\) .*1.weight, 1.bias"):
        check_materialized(layer, "w.pth")
    assert not nn.Linear(2, 2).weight.is_meta  # the context is over: modules are built as usual again


def test_build_on_meta_is_this_threads_and_the_innermost_block_decides():
    """Another thread builds as usual meanwhile; a nested block without a dtype keeps the declared one; torch's
    methods are back once the last block closes."""
    import threading

    from upernet_vit.backbones import meta

    other, entered, built = {}, threading.Event(), threading.Event()

    def build_elsewhere():
        entered.wait(5)
        other["layer"] = nn.Linear(2, 2)
        built.set()

    thread = threading.Thread(target=build_elsewhere)
    thread.start()
    with build_on_meta(torch.bfloat16):
        entered.set()
        assert built.wait(5)
        with build_on_meta():
            inner = nn.Linear(2, 2)
        outer = nn.Linear(2, 2)
    thread.join()
    assert not other["layer"].weight.is_meta
    assert inner.weight.is_meta and inner.weight.dtype == torch.float32
    assert outer.weight.is_meta and outer.weight.dtype == torch.bfloat16
    assert not meta._hooks and "load_state_dict" not in inner.__dict__  # nothing left once the last block closes
    assert nn.Module.__dict__["load_state_dict"].__module__ == "torch.nn.modules.module"  # never replaced


def test_a_copy_made_in_the_block_loads_as_torch_does_after_it():
    import copy
    import warnings

    with build_on_meta(torch.bfloat16):
        layer = nn.Linear(2, 2)
        twin = copy.deepcopy(layer)  # the instance's assigning load comes along with the copy
    assert "load_state_dict" in twin.__dict__
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own: copying into a meta parameter is a no-op
        twin.load_state_dict({"weight": torch.ones(2, 2), "bias": torch.zeros(2)})
    assert twin.weight.is_meta  # not assigned: outside the block a load is torch's own
    assert "load_state_dict" not in twin.__dict__


def test_a_modules_own_load_assigns_only_inside_the_block():
    """The assigning load belongs to the modules built in the block, while it is open: afterwards the same
    module loads as torch's does (copying), and one built outside never assigned."""
    with build_on_meta(torch.bfloat16):
        layer = nn.Linear(2, 2)
        assert "load_state_dict" in layer.__dict__
        layer.load_state_dict({"weight": torch.ones(2, 2), "bias": torch.zeros(2)})
    assert "load_state_dict" not in layer.__dict__ and layer.weight.dtype == torch.bfloat16
    weight = layer.weight
    layer.load_state_dict({"weight": torch.full((2, 2), 2.0), "bias": torch.zeros(2)})
    assert layer.weight is weight and float(weight.detach()[0, 0]) == 2.0  # copied into, as torch does


@pytest.mark.slow
def test_building_a_bfloat16_backbone_from_a_float32_file_holds_no_float32_copy(tmp_path):
    """Measured, not inferred: a 24-block, 512-wide ViT (76M parameters: 302 MB in float32, 151 MB in
    bfloat16) from a float32 file. The process's own memory (RssAnon; the memory-mapped file's pages are page
    cache) grows by the bfloat16 weights and the small decoder, far below the float32 size that the ordinary
    build-then-cast path holds."""
    torch.manual_seed(0)
    kwargs = dict(depth=24, embed_dim=512, num_heads=8)
    vit = UperNetViT("vit_base_patch16_224", None, 2, hidden_size=8, backbone_kwargs=kwargs).backbone.vit
    torch.save(vit.state_dict(), tmp_path / "w.pth")
    float32_mb = sum(p.numel() for p in vit.parameters()) * 4 / 2**20
    code = (
        "import json, sys, torch; sys.path.insert(0, 'benchmarks')\n"
        "from model_memory import PeakAnonMemory, _status_mb\n"
        "from upernet_vit import UperNetViT\n"
        "before = _status_mb('RssAnon')\n"
        "with PeakAnonMemory() as peak:\n"
        f"    m = UperNetViT('vit_base_patch16_224', None, 2, hidden_size=8, backbone_kwargs={kwargs!r},\n"
        f"                   checkpoint_path={str(tmp_path / 'w.pth')!r}, backbone_dtype=sys.argv[1],\n"
        "                   freeze_backbone=True)\n"
        "print(json.dumps(peak.peak_mb - before))\n"
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    grown = {dtype: json.loads(subprocess.run([sys.executable, "-c", code, dtype], cwd=ROOT, env=env, check=True,
                                              capture_output=True, text=True).stdout.splitlines()[-1])
             for dtype in ("bfloat16", "float32")}
    assert grown["bfloat16"] < 0.6 * float32_mb + 20, grown  # bf16 weights (0.5x) and the decoder
    assert grown["float32"] > float32_mb, grown  # the ordinary path does hold float32 weights (the test can see it)
