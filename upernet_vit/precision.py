"""Precision, one concept: how the backbone's weights are stored and which dtype autocast computes in.

Two config keys name a precision, with the same spellings:

    model.backbone_dtype   the backbone's storage   float32 (fp32, none) | bfloat16 (bf16) | float16 (fp16)
    train.amp              autocast's compute dtype  the same names; float32 = no autocast

Each spelling is stored in its canonical form, torch's dtype name (``bf16`` -> ``bfloat16``), so a config
written back reads the same whichever spelling the user typed. :class:`Precision` is resolved once from a
config and answers the questions a run asks: the storage dtype, the autocast dtype, whether a GradScaler
is needed (float16 compute: its gradients underflow without one), the bytes of an activation for the memory
estimate, and whether a device can run it.

The rule for storage below float32 (a bfloat16 backbone is never fully trained: AdamW's updates of a few
1e-5 round away against bfloat16's 8-bit mantissa) is checked in the config (``config.Config``) and in the
model's API (``lora.set_backbone_trainable``).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, ContextManager, Literal, Optional

import torch

if TYPE_CHECKING:
    from .config import Config

# every spelling a config key or a flag accepts -> its canonical name
SPELLINGS = {
    "float32": "float32", "fp32": "float32", "none": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16",
}
PrecisionName = Literal["float32", "fp32", "none", "bfloat16", "bf16", "float16", "fp16"]
FULL = "float32"


def canonical_precision(name: str, what: str = "precision") -> str:
    """``name`` in its canonical form (``bf16`` -> ``bfloat16``); ``what`` names the key or parameter in
    the error."""
    if isinstance(name, str) and name in SPELLINGS:  # exact, as the config keys and --amp take them
        return SPELLINGS[name]
    raise ValueError(f"{what} {name!r}: use one of {', '.join(SPELLINGS)}")


def precision_dtype(name: str) -> torch.dtype:
    """The torch dtype of a precision name in any spelling."""
    return getattr(torch, canonical_precision(name))


def autocast_dtype(name: str, device: torch.device, what: str = "amp") -> Optional[torch.dtype]:
    """The autocast dtype for ``name`` on ``device`` (None: float32, no autocast); float16 autocast needs
    CUDA (on the CPU it is slower than float32 and needs a GradScaler that the CPU path lacks)."""
    canonical = canonical_precision(name, what)
    if canonical == "float16" and device.type != "cuda":
        raise ValueError(f"{what} {name!r}: float16 (fp16) autocast needs CUDA (device is {device}); on the CPU "
                         f"use bfloat16 or float32")
    return None if canonical == FULL else getattr(torch, canonical)


@dataclass(frozen=True)
class Precision:
    """A run's precision, from ``model.backbone_dtype`` (``storage``) and ``train.amp`` (``compute``),
    both canonical names."""

    storage: str = FULL
    compute: str = FULL

    @classmethod
    def from_config(cls, config: "Config") -> "Precision":
        """From a :class:`~upernet_vit.config.Config` (its keys are canonical already)."""
        return cls(canonical_precision(config.model.backbone_dtype, "model.backbone_dtype"),
                   canonical_precision(config.train.amp, "train.amp"))

    @property
    def storage_dtype(self) -> torch.dtype:
        return getattr(torch, self.storage)

    @property
    def compute_dtype(self) -> Optional[torch.dtype]:
        """Autocast's dtype; None: float32, no autocast."""
        return None if self.compute == FULL else getattr(torch, self.compute)

    @property
    def grad_scaler(self) -> bool:
        """float16 compute needs loss scaling; bfloat16 has float32's range and does not."""
        return self.compute == "float16"

    @property
    def activation_bytes(self) -> int:
        """Bytes of one saved activation value (the memory estimate)."""
        return 4 if self.compute == FULL else 2

    def check_device(self, device: torch.device) -> None:
        """A ValueError naming the key if ``device`` cannot run this precision."""
        autocast_dtype(self.compute, device, "train.amp")
        if self.storage == "float16" and device.type == "cpu":
            raise ValueError("model.backbone_dtype float16 needs a GPU; on the CPU use bfloat16 or float32")
        if self.storage == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(
                f"model.backbone_dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                f"use float16 or float32"
            )

    def autocast(self, device: torch.device) -> ContextManager[None]:
        """Autocast in ``compute`` on ``device``'s type, or nothing for float32."""
        dtype = self.compute_dtype
        return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)
