"""YAML config -> validated dataclasses. Errors name the dotted key, the file and the closest valid key."""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import yaml

Norm = Literal["layernorm", "groupnorm", "batchnorm", "none"]
Upsampler = Literal["bilinear", "progressive"]


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the dotted key path."""


@dataclass
class DecoderConfig:
    hidden_size: int = 512  # UperNet channels (mmseg ``channels``, HF ``hidden_size``)
    pool_scales: List[int] = field(default_factory=lambda: [1, 2, 3, 6])
    norm: Norm = "layernorm"
    dropout: float = 0.1
    upsampler: Upsampler = "bilinear"
    aux_head: bool = False
    aux_channels: int = 256
    winograd: bool = True  # 3x3 FPN convs by Winograd F(2x2,3x3) on CPU fp32 (same weights, ~2x fewer FLOPs)


@dataclass
class ModelConfig:
    backbone: str = "dinov2"  # preset (dinov2, dinov2_reg4, dinov3, retfound, visionfm) or timm name
    backbone_size: Optional[str] = "base"  # null for a timm name
    num_classes: Optional[int] = None  # incl. background; may come from the dataset instead
    in_chans: int = 3  # training takes it from the dataset
    checkpoint_path: Optional[str] = None  # "" or null: random init
    checkpoint_format: Literal["auto", "timm", "dinov2", "dinov3", "retfound_mae", "visionfm"] = "auto"
    trust_checkpoint: bool = False  # allow full unpickling of checkpoint_path (runs code in the file)
    norm_stats: Optional[str] = None  # named input stats (e.g. visionfm_oct); null: the preset's
    feature_indices: Optional[List[int]] = None  # null: [d/4-1, d/2-1, 3d/4-1, d-1]
    freeze_backbone: bool = False
    gradient_checkpointing: bool = False  # recompute backbone blocks in backward: less memory, more time
    backbone_kwargs: Dict[str, Any] = field(default_factory=dict)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    lora_alpha: float = 16.0
    target_modules: List[str] = field(default_factory=lambda: ["qkv"])
    lora_dropout: float = 0.05


@dataclass
class TrainConfig:
    """The first six keys mean what they mean in nnU-Net (an epoch is num_iterations_per_epoch batches)."""

    initial_lr: float = 1e-3
    weight_decay: float = 3e-5
    gradient_clip: float = 12.0  # max grad norm; 0 disables
    num_epochs: int = 1000
    num_iterations_per_epoch: int = 250
    num_val_iterations_per_epoch: int = 50  # validation-loss batches per epoch
    optimizer: Literal["adamw", "sgd"] = "adamw"  # sgd = SGD with Nesterov momentum
    momentum: float = 0.99  # sgd only
    warmup_epochs: float = 5.0  # linear warmup, then poly decay
    poly_exponent: float = 0.9
    layer_decay: Optional[float] = None  # e.g. 0.75: backbone block i gets lr * decay^(depth - i)
    amp: Literal["none", "bf16", "fp16"] = "none"  # fp16 needs CUDA (uses a GradScaler)
    aux_weight: float = 0.4  # auxiliary-head loss weight (when model.decoder.aux_head)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    val_every: int = 1  # whole-image validation every N epochs (and always at the last)
    val_mirror: bool = False  # mirror TTA in validation
    num_overlays: int = 4  # validation overlays written to the run folder
    output_dir: Optional[str] = None  # default: runs/<config file name>


@dataclass
class AugmentationConfig:
    scale_range: List[float] = field(default_factory=lambda: [0.7, 1.4])  # zoom factors
    rotation_degrees: float = 180.0
    flip: bool = True
    intensity: bool = True


@dataclass
class DataConfig:
    format: Literal["demo", "nnunet", "folders"] = "demo"
    root: Optional[str] = None  # nnunet: the raw Dataset### folder; folders: with images/ and masks/
    patch_size: List[int] = field(default_factory=lambda: [224, 224])
    batch_size: int = 2  # global batch (split across DDP processes)
    fold: Union[int, Literal["all"]] = 0
    num_folds: int = 5
    splits_file: Optional[str] = None  # nnU-Net splits_final.json; default <root>/splits_final.json if present
    num_workers: int = 2
    normalization: Literal["preset", "zscore"] = "preset"  # backbone mean/std, or per-image z-score
    labels: Optional[Dict[str, int]] = None  # folders only: name -> value (default: values found)
    demo_cases: int = 64  # demo only
    demo_image_size: int = 96  # demo only
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (list, List):
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin in (dict, Dict):
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(value: Any, tp: Any, path: str) -> Any:
    """``value`` checked against type ``tp``; raises ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:  # an empty section (only comments) means all defaults
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return _build(tp, value, path + ".")
    if origin is Union:
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, path)
            except ConfigError as err:
                errors.append((arg, err))
        # report the arm the value was meant for (e.g. the list in Optional[List[int]]), not "null"
        for arg, err in errors:
            if arg is not type(None) and (typing.get_origin(arg) in (list, List)) == isinstance(value, (list, tuple)):
                if str(err).startswith(f"{path}["):
                    raise err
    elif origin is Literal:
        options = typing.get_args(tp)
        if value in options:
            return value
        close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{path}: expected {_describe(tp)}, got {value!r}{hint}")
    elif origin in (list, List):
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(tp)
            return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    elif origin in (dict, Dict):
        if isinstance(value, Mapping):
            return dict(value)
    elif tp is Any:
        return value
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{path}: expected {_describe(tp)}, got {value!r} ({type(value).__name__})")


def _positive(v: Any) -> bool:
    return v >= 1


# (class, field) -> (check, what the value must be)
_CHECKS: Dict[Tuple[str, str], Tuple[Callable[[Any], bool], str]] = {
    ("DecoderConfig", "hidden_size"): (_positive, ">= 1"),
    ("DecoderConfig", "pool_scales"): (lambda v: len(v) > 0 and all(s >= 1 for s in v), "a non-empty list of integers >= 1"),
    ("DecoderConfig", "dropout"): (lambda v: 0 <= v < 1, "in [0, 1)"),
    ("DecoderConfig", "aux_channels"): (_positive, ">= 1"),
    ("ModelConfig", "num_classes"): (lambda v: v is None or v >= 1, ">= 1 (background included) or null"),
    ("ModelConfig", "in_chans"): (_positive, ">= 1"),
    ("ModelConfig", "feature_indices"): (lambda v: v is None or len(v) == 4, "4 block indices or null"),
    ("LoraConfig", "r"): (_positive, ">= 1"),
    ("LoraConfig", "lora_dropout"): (lambda v: 0 <= v < 1, "in [0, 1)"),
    ("LoraConfig", "target_modules"): (lambda v: len(v) > 0, "a non-empty list of module names"),
    ("TrainConfig", "initial_lr"): (lambda v: v > 0, "> 0"),
    ("TrainConfig", "weight_decay"): (lambda v: v >= 0, ">= 0"),
    ("TrainConfig", "gradient_clip"): (lambda v: v >= 0, ">= 0 (0 disables clipping)"),
    ("TrainConfig", "num_epochs"): (_positive, ">= 1"),
    ("TrainConfig", "num_iterations_per_epoch"): (_positive, ">= 1"),
    ("TrainConfig", "num_val_iterations_per_epoch"): (lambda v: v >= 0, ">= 0"),
    ("TrainConfig", "warmup_epochs"): (lambda v: v >= 0, ">= 0"),
    ("TrainConfig", "layer_decay"): (lambda v: v is None or 0 < v <= 1, "in (0, 1] or null"),
    ("TrainConfig", "val_every"): (_positive, ">= 1"),
    ("TrainConfig", "num_overlays"): (lambda v: v >= 0, ">= 0"),
    ("AugmentationConfig", "scale_range"): (lambda v: len(v) == 2 and 0 < v[0] <= v[1], "[low, high] with 0 < low <= high"),
    ("DataConfig", "patch_size"): (lambda v: len(v) == 2 and min(v) >= 1, "[height, width], each >= 1"),
    ("DataConfig", "batch_size"): (_positive, ">= 1"),
    ("DataConfig", "num_folds"): (lambda v: v >= 2, ">= 2"),
    ("DataConfig", "fold"): (lambda v: v == "all" or v >= 0, "a fold number >= 0 or 'all'"),
    ("DataConfig", "num_workers"): (lambda v: v >= 0, ">= 0"),
    ("DataConfig", "demo_cases"): (lambda v: v >= 2, ">= 2"),
    ("DataConfig", "demo_image_size"): (lambda v: v >= 8, ">= 8"),
}


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
            raise ConfigError(
                f"{prefix}{key}: unknown key; {hint}valid keys here: {', '.join(names)}"
            )
    obj = cls(**{k: _convert(v, hints[k], prefix + k) for k, v in data.items()})
    for name in names:
        check = _CHECKS.get((cls.__name__, name))
        value = getattr(obj, name)
        if check and not check[0](value):
            raise ConfigError(f"{prefix}{name}: must be {check[1]}, got {value!r}")
    return obj


def load_config(source: Union[str, os.PathLike, Mapping[str, Any], Config]) -> Config:
    """A :class:`Config` from a YAML file path, a dict with the same layout, or a Config (returned as is).

    Missing keys take their defaults; unknown keys and wrong types raise :class:`ConfigError`
    naming the dotted key (``model.decoder.hidden_size``), the file and the closest valid key.
    """
    if isinstance(source, Config):
        return source
    origin = "config"
    if isinstance(source, (str, os.PathLike)):
        origin = os.fspath(source)
        if not os.path.isfile(origin):
            raise FileNotFoundError(f"config file {origin!r} does not exist")
        with open(origin, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"{origin}: not valid YAML: {err}") from err
    else:
        data = source
    if not isinstance(data, Mapping):
        raise ConfigError(f"{origin}: the top level must be a mapping with sections model/lora/train/data")
    try:
        return _build(Config, data)
    except ConfigError as err:
        raise ConfigError(f"{origin}: {err}") from None


ALL_SECTIONS = ("model", "lora", "train", "data")


def config_to_yaml(config: Config, sections: Sequence[str] = ALL_SECTIONS) -> str:
    """YAML text of the named sections, which :func:`load_config` reads back to an equal Config."""
    data = config.to_dict()
    return yaml.safe_dump({name: data[name] for name in sections}, sort_keys=False)


def save_config(config: Config, path: Union[str, os.PathLike], sections: Sequence[str] = ALL_SECTIONS) -> None:
    """Write ``config`` (the named sections) to ``path`` as YAML."""
    text = config_to_yaml(config, sections)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
