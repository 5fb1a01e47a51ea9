"""YAML config -> validated dataclasses. Errors name the dotted key, the file and the closest valid key."""
from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import yaml

from .precision import PrecisionName, canonical_precision


Norm = Literal["layernorm", "groupnorm", "batchnorm", "none"]
Upsampler = Literal["bilinear", "progressive"]


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the dotted key path."""


def option(default: Any = dataclasses.MISSING, *, factory: Optional[Callable[[], Any]] = None,
           check: Optional[Callable[[Any], bool]] = None, must: str = "",
           canonical: Optional[Callable[[Any], Any]] = None) -> Any:
    """A dataclass field whose value must satisfy ``check`` ("must be ``must``"), tested at construction;
    ``canonical`` maps an accepted spelling to the one form stored (``bf16`` -> ``bfloat16``)."""
    metadata: Dict[str, Any] = {"check": (check, must)} if check is not None else {}
    if canonical is not None:
        metadata["canonical"] = canonical
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _positive(v: Any) -> bool:
    return v >= 1


def _non_negative(v: Any) -> bool:
    return v >= 0


def _fraction(v: Any) -> bool:
    return 0 <= v < 1


def _positive_real(v: Any) -> bool:
    return v > 0


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key written twice in one mapping is an error (PyYAML keeps the
    last). Keys that a merge (``<<: *anchor``) brings in may be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        seen: Dict[Tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = (key_node.tag, key_node.value), key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key_node.value!r} is given twice (lines {seen[key]} and {line}); keep one",
                    key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Union[str, os.PathLike]) -> Any:
    """The YAML document in ``path``; a syntax error or a duplicate key is a :class:`ConfigError` naming the
    file, the key and the line."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{os.fspath(path)}: not valid YAML: {err}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{os.fspath(path)}: not a UTF-8 text file ({err.reason} at byte {err.start})") from err


class _Checked:
    """Runs each field's ``option(check=...)`` at construction; a failure is a ConfigError naming the field."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            check, must = f.metadata.get("check", (None, ""))
            value = getattr(self, f.name)
            numbers_in = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, numbers.Real) and not math.isfinite(v) for v in numbers_in):
                raise ConfigError(f"{f.name}: must be a finite number, got {value!r}")
            try:
                ok = check is None or check(value)
            except TypeError:
                ok = False
            if not ok:
                raise ConfigError(f"{f.name}: must be {must}, got {value!r}")
            if "canonical" in f.metadata:
                object.__setattr__(self, f.name, f.metadata["canonical"](value))


# a precision key (model.backbone_dtype, train.amp): every spelling of precision.SPELLINGS, stored canonical
PRECISION_OPTION: Dict[str, Any] = dict(
    check=lambda v: v in typing.get_args(PrecisionName), must=", ".join(typing.get_args(PrecisionName)),
    canonical=canonical_precision,
)


@dataclass
class DecoderConfig(_Checked):
    # the UperNet width: HF's and the seed's ``hidden_size``; ``UperNetHead(channels=...)`` keeps mmseg's name
    hidden_size: int = option(512, check=_positive, must=">= 1")
    pool_scales: List[int] = option(  # the PPM's pooled grid sizes (1: global average pooling)
        factory=lambda: [1, 2, 3, 6], check=lambda v: len(v) > 0 and all(s >= 1 for s in v),
        must="a non-empty list of integers >= 1",
    )
    norm: Norm = "layernorm"  # layernorm | groupnorm | batchnorm (mmseg/HF weights) | none
    dropout: float = option(0.1, check=_fraction, must="in [0, 1)")  # before the classifiers
    upsampler: Upsampler = "bilinear"  # stride 4 -> 1: bilinear, or progressive (two learned 2x stages)
    # ViT maps -> pyramid: simple (D channels at every level; mmseg's BEiT/MAE necks load) or vitdet (narrower
    # upsampling, then a projection to hidden_size: far less memory for wide ViTs such as DINOv3-7B)
    pyramid: Literal["simple", "vitdet"] = "simple"
    aux_head: bool = False  # auxiliary FCN head on the pyramid's 1x level (training signal)
    aux_channels: int = option(256, check=_positive, must=">= 1")  # width of the auxiliary FCN head


@dataclass
class ModelConfig(_Checked):
    """Every model option, once. ``UperNetViT(**options)``, ``UperNetViT.from_config``, the YAML ``model``
    section and ``create_segmentation_model`` all map onto these fields (see :func:`model_config`)."""

    backbone: str = "dinov2"  # preset (dinov2, dinov2_reg4, dinov3, retfound, visionfm, ...) or timm ViT name
    backbone_size: Optional[str] = None  # preset size; null: a timm name, or a one-size preset's size
    # classes, background included; null: from the dataset's labels (training) or the saved model
    num_classes: Optional[int] = option(None, check=lambda v: v is None or v >= 1, must=">= 1 (background included) or null")
    in_chans: int = option(3, check=_positive, must=">= 1")  # training takes it from the dataset
    checkpoint_path: Optional[str] = None  # "" or null: random init
    pretrained: bool = False  # timm's pretrained weights (preset tag or the timm name's tag); needs the hub or its cache
    # the key layout of checkpoint_path; auto: detected from its keys
    checkpoint_format: Literal["auto", "timm", "dinov2", "dinov3", "retfound_mae", "visionfm"] = "auto"
    trust_checkpoint: bool = False  # allow full unpickling of checkpoint_path (runs code in the file)
    norm_stats: Optional[str] = None  # named input stats (e.g. visionfm_oct); null: the preset's
    # the 4 ViT blocks tapped for the pyramid; null: [d/4-1, d/2-1, 3d/4-1, d-1] for depth d (later blocks pruned)
    feature_indices: Optional[List[int]] = option(None, check=lambda v: v is None or len(v) == 4, must="4 block indices or null")
    freeze_backbone: bool = False  # train the decoder only; the backbone keeps the weights it was loaded with
    gradient_checkpointing: bool = False  # recompute backbone blocks in backward: less memory, more time
    # stochastic depth: the last block is dropped with this probability in training, earlier ones linearly
    # less (timm); the first regularizer to tune when fine-tuning a large backbone (e.g. 0.1-0.4)
    drop_path_rate: float = option(0.0, check=lambda v: 0 <= v < 1, must="in [0, 1)")
    # storage dtype of a backbone that does not train itself (freeze_backbone, or LoRA adapters, which stay
    # float32 like the decoder): bfloat16 halves its memory; full fine-tuning needs float32 (precision.py)
    backbone_dtype: PrecisionName = option("float32", **PRECISION_OPTION)
    backbone_kwargs: Dict[str, Any] = field(default_factory=dict)  # to timm.create_model
    decoder: DecoderConfig = field(default_factory=DecoderConfig)


@dataclass
class LoraConfig(_Checked):
    # LoRA adapters (peft) on the backbone's target layers; then only they and the decoder train
    enabled: bool = False
    r: int = option(8, check=_positive, must=">= 1")  # the adapters' rank
    lora_alpha: float = option(16.0, check=_positive_real, must="> 0")  # the adapters' output is scaled by lora_alpha / r
    # the backbone's linear layers (name suffixes) that get adapters; a name matching none is an error
    # listing the backbone's linear layers
    target_modules: List[str] = option(factory=lambda: ["qkv"], check=lambda v: len(v) > 0, must="a non-empty list of module names")
    lora_dropout: float = option(0.05, check=_fraction, must="in [0, 1)")  # dropout on the adapters' input


# test-time scale factors (train.val_scales, predict --scales): beyond them an image is blown up past any
# use (a percent typo, 100, ran for minutes on 96 px images) or shrunk to a few pixels
TTA_SCALES = (0.25, 4.0)


@dataclass
class TrainConfig(_Checked):
    """The first six keys mean what they mean in nnU-Net (an epoch is num_iterations_per_epoch batches)."""

    initial_lr: float = option(1e-3, check=_positive_real, must="> 0")  # the learning rate after warmup
    weight_decay: float = option(3e-5, check=_non_negative, must=">= 0")  # none on norms, biases and tokens
    gradient_clip: float = option(12.0, check=_non_negative, must=">= 0 (0 disables clipping)")  # max grad norm
    num_epochs: int = option(1000, check=_positive, must=">= 1")  # the run's length; the poly schedule ends with it
    num_iterations_per_epoch: int = option(250, check=_positive, must=">= 1")  # training batches per epoch
    num_val_iterations_per_epoch: int = option(50, check=_non_negative, must=">= 0")  # validation-loss batches
    optimizer: Literal["adamw", "sgd"] = "adamw"  # sgd = SGD with Nesterov momentum
    # under torchrun: ddp (a whole model per GPU) or fsdp (weights, gradients and optimizer state sharded
    # across the GPUs: full fine-tuning of a model one GPU cannot train); one process without torchrun
    distributed: Literal["ddp", "fsdp"] = "ddp"
    momentum: float = option(0.99, check=_fraction, must="in [0, 1)")  # sgd only
    warmup_epochs: float = option(5.0, check=_non_negative, must=">= 0")  # linear warmup, then poly decay
    poly_exponent: float = option(0.9, check=_non_negative, must=">= 0")  # after warmup: lr x (1 - progress)^exponent, per iteration
    layer_decay: Optional[float] = option(  # e.g. 0.75: backbone block i gets lr * decay^(depth - i)
        None, check=lambda v: v is None or 0 < v <= 1, must="in (0, 1] or null"
    )
    # autocast's dtype (mixed precision): float32 = none, bfloat16 (bf16), float16 (fp16: CUDA, a GradScaler)
    amp: PrecisionName = option("float32", **PRECISION_OPTION)
    class_weights: Union[None, Literal["auto"], List[float]] = option(  # CE weight per class (Dice unchanged)
        None, check=lambda v: v is None or v == "auto" or (min(v) >= 0 and max(v) > 0),
        must="null, 'auto' (inverse pixel frequency) or a list of weights >= 0, one per class, not all 0",
    )
    aux_weight: float = option(0.4, check=_non_negative, must=">= 0")  # auxiliary-head loss weight (when model.decoder.aux_head)
    seed: int = 0  # seeds initialization, data order and augmentation: a seeded CPU run repeats exactly
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    val_every: int = option(1, check=_positive, must=">= 1")  # whole-image validation every N epochs (and the last)
    check_memory: bool = True  # refuse, before training, a run whose memory estimate exceeds the device (training/memory.py)
    val_mirror: bool = False  # mirror TTA in validation
    val_scales: List[float] = option(  # multi-scale TTA in validation (as predict --scales)
        factory=lambda: [1.0], check=lambda v: len(v) > 0 and TTA_SCALES[0] <= min(v) and max(v) <= TTA_SCALES[1],
        must=f"a non-empty list of factors in [{TTA_SCALES[0]}, {TTA_SCALES[1]}]",
    )
    num_overlays: int = option(4, check=_non_negative, must=">= 0")  # validation overlays written to the run folder
    logger: Literal["none", "tensorboard", "wandb"] = "none"  # also log to TensorBoard / W&B (optional extras)
    output_dir: Optional[str] = None  # default: runs/<config file name>


@dataclass
class AugmentationConfig(_Checked):
    scale_range: List[float] = option(
        factory=lambda: [0.7, 1.4], check=lambda v: len(v) == 2 and 0 < v[0] <= v[1],
        must="[low, high] with 0 < low <= high",
    )  # zoom factors
    # random rotation in [-d, d] degrees, of the whole image before the crop (corners from outside are ignored)
    rotation_degrees: float = option(180.0, check=_non_negative, must=">= 0")
    flip: bool = True  # random horizontal and vertical flips
    intensity: bool = True  # random brightness, contrast, gamma and noise


@dataclass
class DataConfig(_Checked):
    # demo: built-in synthetic data; nnunet: an nnU-Net v2 raw dataset (dataset.json, imagesTr, labelsTr);
    # folders: images/ and masks/ with matching names
    format: Literal["demo", "nnunet", "folders"] = "demo"
    root: Optional[str] = None  # nnunet: the raw Dataset### folder; folders: with images/ and masks/
    patch_size: List[int] = option(  # training patches in pixels; validation and predict slide a window of it
        factory=lambda: [224, 224], check=lambda v: len(v) == 2 and min(v) >= 1, must="[height, width], each >= 1"
    )
    batch_size: int = option(2, check=_positive, must=">= 1")  # global batch (split across DDP processes)
    # the cross-validation fold trained (nnU-Net's split); all: train and validate on every case
    fold: Union[int, Literal["all"]] = option(0, check=lambda v: v == "all" or v >= 0, must="a fold number >= 0 or 'all'")
    num_folds: int = option(5, check=lambda v: v >= 2, must=">= 2")  # folds of the split
    splits_file: Optional[str] = None  # nnU-Net splits_final.json; default <root>/splits_final.json if present
    num_workers: int = option(2, check=_non_negative, must=">= 0")  # DataLoader worker processes (0: load in the main one)
    normalization: Literal["preset", "zscore"] = "preset"  # backbone mean/std, or per-image z-score
    # preset: pixel values (as stored) / intensity_scale, then the backbone's mean/std; auto: the training
    # images' full scale (1, 255 or 65535), mixed ranges refused (data/intensity.py)
    intensity_scale: Union[Literal["auto"], float] = option(
        "auto", check=lambda v: v == "auto" or v > 0, must="'auto' or a number > 0"
    )
    labels: Optional[Dict[str, int]] = None  # folders only: name -> value (default: values found)
    # the data cache (data/cache.py: the dataset converted once into memory-mapped arrays); null:
    # .upernet-vit-cache beside the run folder. Never inside data.root
    cache_dir: Optional[str] = None
    # volumes (nnU-Net raw .nii.gz): the axis 2-D slices are taken along (0, 1, 2 of the file's voxel
    # array); null: the axis of largest spacing, so that slices are in-plane
    slice_axis: Optional[int] = option(None, check=lambda v: v is None or v in (0, 1, 2), must="0, 1, 2 or null")
    # 2.5-D: each slice gets its k neighbours on each side as extra channels (in_chans = channels x (2k+1))
    context_slices: int = option(0, check=lambda v: 0 <= v <= 16, must="in 0..16")
    # multi-page 2-D files (a TIFF z-stack of electron-microscopy sections), and folders of one-page section
    # files (images/<stack>/<section>.png with masks/<stack>/<section>.png, in natural order), are volumes
    # of their pages and train as volumes do (z-scored per stack, context slices); false: both are refused
    stacks: bool = False
    demo_cases: int = option(64, check=lambda v: v >= 2, must=">= 2")  # demo only
    demo_image_size: int = option(96, check=lambda v: v >= 8, must=">= 8")  # demo only
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        check_backbone_storage(self.model.backbone_dtype, self.model.freeze_backbone, self.lora.enabled)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def check_backbone_storage(dtype: str, frozen: bool, lora: bool, how: str = "yaml") -> None:
    """The precision rule (precision.py): a backbone stored below float32 never trains itself; it is frozen,
    or adapted through LoRA. ``how``: name the YAML keys (``yaml``) or the Python API's (``api``)."""
    if dtype == "float32" or frozen or lora:
        return
    fix = ("set model.freeze_backbone: true or lora.enabled: true, or keep model.backbone_dtype float32"
           if how == "yaml" else "pass freeze_backbone=True (then model.enable_lora() to adapt it), or keep "
           "backbone_dtype='float32'")
    key = f"model.backbone_dtype {dtype}" if how == "yaml" else f"backbone_dtype={dtype!r}"
    raise ConfigError(
        f"{key} stores a backbone that cannot train itself (optimizer updates round away "
        f"in {dtype}): {fix} for full fine-tuning"
    )


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
    elif tp is int:  # numbers.Integral: numpy integers from the API are fine too
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
    elif tp is float:
        number: Optional[float] = None
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:  # finiteness: _Checked, for YAML and direct construction alike
            return number
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
    values = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**values)
    except ConfigError as err:  # a range check (option(check=...)) of this class
        raise ConfigError(f"{prefix}{err}") from None


def load_config(source: Union[str, os.PathLike, Mapping[str, Any], Config], origin: Optional[str] = None) -> Config:
    """A :class:`Config` from a YAML file path, a shipped recipe's name (:mod:`upernet_vit.recipes`), a dict
    with the same layout, or a Config (returned as is).

    Missing keys take their defaults; unknown keys and wrong types raise :class:`ConfigError`
    naming the dotted key (``model.decoder.hidden_size``), the file (``origin`` for a dict read from one)
    and the closest valid key.
    """
    if isinstance(source, Config):
        return source
    origin = origin or "config"
    if isinstance(source, (str, os.PathLike)):
        from .recipes import resolve_config

        origin = resolve_config(os.fspath(source))  # a file, or a shipped recipe's name ("dinov2_base")
        data = read_yaml(origin) or {}
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


def model_option_names() -> List[str]:
    """The flat keyword names :func:`model_config` takes (ModelConfig and DecoderConfig fields, aliases)."""
    model = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "decoder"]
    return model + [f.name for f in dataclasses.fields(DecoderConfig)]


def model_config(base: Optional[ModelConfig] = None, **options: Any) -> ModelConfig:
    """``base`` (default: ``ModelConfig()``) with ``options`` replaced, type- and range-checked like YAML keys.

    ``options`` are flat: every :class:`ModelConfig` field (``backbone``, ``num_classes``, ...) and every
    :class:`DecoderConfig` field by its own name (``hidden_size``, ``pool_scales``, ``norm``, ...). An
    unknown name is a ``TypeError`` naming the closest option; a bad value a :class:`ConfigError` naming
    the field.
    """
    data = dataclasses.asdict(base if base is not None else ModelConfig())
    top = {f.name for f in dataclasses.fields(ModelConfig)} - {"decoder"}
    decoder = {f.name for f in dataclasses.fields(DecoderConfig)}
    for key, value in options.items():
        if key in top:
            data[key] = value
        elif key in decoder:
            data["decoder"][key] = value
        else:
            close = difflib.get_close_matches(key, model_option_names(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"unknown model option {key!r}{hint}; options: {', '.join(model_option_names())}")
    return _build(ModelConfig, data)


def check_training_storage(config: Config) -> None:
    """What a training run adds to the precision rule (``Config`` checks that one on load), before anything
    is built: a backbone stored below float32 is filled from weights (``model.checkpoint_path`` or
    ``model.pretrained``): a random frozen backbone trains nothing, and one built without weights is
    initialized in float32 first (4 bytes a weight: 27 GB for a 7B ViT)."""
    model = config.model
    if model.backbone_dtype == "float32":
        return
    if not (model.checkpoint_path or model.pretrained):
        raise ConfigError(
            f"model.backbone_dtype {model.backbone_dtype} keeps the backbone frozen, but it has no weights "
            f"(model.checkpoint_path is empty and model.pretrained is false): the run would train on a random "
            f"backbone. Set model.checkpoint_path to the downloaded weights file, or model.pretrained: true for "
            f"timm's weights"
        )
