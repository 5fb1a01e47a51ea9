"""upernet-vit: UperNet on plain ViT foundation-model backbones, in pure PyTorch."""
import re

import torch

TORCH_MIN = (2, 7)  # torch.compiler.is_exporting (2.7; safe_globals for weights-only loading came in 2.5)


def _check_torch_version(version: str) -> None:
    """ImportError naming the fix if ``version`` (a torch version string) is below :data:`TORCH_MIN`."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None or tuple(int(p) for p in match.groups()) < TORCH_MIN:
        need = ".".join(map(str, TORCH_MIN))
        raise ImportError(f"upernet-vit needs torch >= {need}, found {version}; pip install 'torch>={need}'")


_check_torch_version(torch.__version__)

from .backbones import create_backbone  # noqa: E402
from .config import Config, ConfigError, load_config  # noqa: E402
from .convert import from_hf_upernet, from_mmseg_neck, from_mmseg_upernet  # noqa: E402
from .factory import create_segmentation_model  # noqa: E402
from .fpn import FPNFusion  # noqa: E402
from .head import FCNHead, UperNetHead  # noqa: E402
from .model import UperNetViT  # noqa: E402
from .ppm import PyramidPoolingModule  # noqa: E402
from .vit_adapter import SimpleFeaturePyramid, default_feature_indices  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "FCNHead",
    "FPNFusion",
    "PyramidPoolingModule",
    "SimpleFeaturePyramid",
    "UperNetHead",
    "UperNetViT",
    "create_backbone",
    "create_segmentation_model",
    "default_feature_indices",
    "from_hf_upernet",
    "from_mmseg_neck",
    "from_mmseg_upernet",
    "load_config",
]
