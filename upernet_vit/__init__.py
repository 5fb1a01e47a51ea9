"""upernet-vit: UperNet on plain ViT foundation-model backbones, in pure PyTorch."""
from .backbones import create_backbone
from .config import Config, ConfigError, load_config
from .convert import from_hf_upernet, from_mmseg_upernet
from .factory import create_segmentation_model
from .fpn import FPNFusion
from .head import FCNHead, UperNetHead
from .model import UperNetViT
from .ppm import PyramidPoolingModule
from .vit_adapter import SimpleFeaturePyramid, default_feature_indices

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
    "from_mmseg_upernet",
    "load_config",
]
