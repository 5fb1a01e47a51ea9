"""YAML config -> validated dataclasses. Errors name the dotted key, the file and the closest valid key."""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Union

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


@dataclass
class ModelConfig:
    backbone: str = "dinov2"  # preset (dinov2, dinov2_reg4, dinov3, retfound, visionfm) or timm name
    backbone_size: Optional[str] = "base"  # null for a timm name
    num_classes: Optional[int] = None  # incl. background; may come from the dataset instead
    in_chans: int = 3
    checkpoint_path: Optional[str] = None  # "" or null: random init
    feature_indices: Optional[List[int]] = None  # null: [d/4-1, d/2-1, 3d/4-1, d-1]
    freeze_backbone: bool = False
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
    """Keys mean what they mean in nnU-Net."""

    initial_lr: float = 1e-3
    weight_decay: float = 3e-5
    gradient_clip: float = 12.0
    num_epochs: int = 1000
    num_iterations_per_epoch: int = 250
    num_val_iterations_per_epoch: int = 50


@dataclass
class DataConfig:
    format: Literal["demo", "nnunet", "folders"] = "demo"
    root: Optional[str] = None
    patch_size: List[int] = field(default_factory=lambda: [224, 224])
    batch_size: int = 2
    fold: int = 0
    num_workers: int = 2


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
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return _build(tp, value, path + ".")
    if origin is Union:
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, path)
            except ConfigError:
                continue
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
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{path}: expected {_describe(tp)}, got {value!r} ({type(value).__name__})")


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
    return cls(**{k: _convert(v, hints[k], prefix + k) for k, v in data.items()})


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


def save_config(
    config: Config, path: Union[str, os.PathLike], sections: Sequence[str] = ("model", "lora", "train", "data")
) -> None:
    """Write ``config`` (the named sections) as YAML that :func:`load_config` reads back."""
    data = config.to_dict()
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump({name: data[name] for name in sections}, f, sort_keys=False)
