"""A memory estimate before training: will the configured run fit the device, and if not, what to change.

    weights      every parameter at its storage dtype (a ``backbone_dtype: bfloat16`` backbone: 2 bytes)
    optimizer    per trainable parameter: its float32 gradient and AdamW's two moments (SGD: one)
    activations  what backward keeps, per image of the batch:
                 ViT blocks, each ~ 17 N D values (N tokens, width D: layer norms, qkv, attention output,
                 MLP), or, with gradient checkpointing, N D per block plus one block's worth; the pyramid and the head ~ 2 D + 12 C values per stride-4 pixel
                 (C = hidden_size: the 4x level, laterals, fpn convs, the fused levels, the bottleneck),
                 D + 16 C with ``pyramid: vitdet`` (narrower upsampling, four projections);
                 4 bytes a value, 2 under bf16/fp16 autocast

The activation rule is the usual transformer count (Korthikanti et al., 2022) without the attention
probabilities, which timm's fused attention (``scaled_dot_product_attention``, flash kernels on CPU and GPU)
does not keep. It is an estimate for choosing settings, not a measurement (``benchmarks/model_memory.py``
measures; for ViT-B/16 at 512 px, batch 2, the reference model's step kept 2.3 GB beyond the weights and
their gradients, estimated 2.2 GB; with gradient checkpointing 0.77 GB, estimated 1.1 GB). ViT-L/16 (DINOv3)
in float32, full fine-tuning, one step on the CPU plus the AdamW moments that later steps hold throughout:
512 px, batch 1: 8.0 GB for 7.3 estimated; batch 2: 9.3 for 9.4; 768 px, batch 1: 10.0 for 9.9; 1024 px,
batch 1: 14.5 for 13.6. So a run estimated at over :data:`NEAR_LIMIT` of the device's memory is warned of, and
one over all of it refused; ``train.check_memory: false`` skips the refusal.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ..model import UperNetViT
from ..precision import Precision, canonical_precision

logger = logging.getLogger(__name__)

# an estimate above this share of the device's memory is warned of: the measured steps of ViT-L/16 in float32
# (CPU, 512-1024 px, batch 1-2) needed from 1% less to 9% more than estimated (docstring)
NEAR_LIMIT = 0.85


@dataclass
class MemoryEstimate:
    weights: int  # bytes
    optimizer: int  # bytes: gradients and optimizer state of the trainable parameters
    activations: int  # bytes kept for backward, for the whole batch

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.activations


def estimate_training_memory(
    model: UperNetViT, batch_size: int, patch_size: Sequence[int], amp: str = "float32", optimizer: str = "adamw"
) -> MemoryEstimate:
    """The :class:`MemoryEstimate` of one training step of ``model`` on ``batch_size`` patches of
    ``patch_size`` (per process); ``amp``: autocast's precision (any spelling of :mod:`upernet_vit.precision`)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer_bytes = trainable * 4 * (3 if optimizer == "adamw" else 2)
    patch = model.patch_size
    tokens = math.ceil(patch_size[0] / patch) * math.ceil(patch_size[1] / patch) + model.backbone.num_prefix_tokens
    width, depth = model.backbone.embed_dim, model.backbone.depth
    block = 17 * tokens * width
    checkpointing = bool(getattr(model.backbone.vit, "grad_checkpointing", False))
    backbone = depth * tokens * width + block if checkpointing else depth * block
    stride4 = math.ceil(patch_size[0] / 4) * math.ceil(patch_size[1] / 4)
    hidden = model.config.decoder.hidden_size
    per_pixel = 2 * width + 12 * hidden if model.config.decoder.pyramid == "simple" else width + 16 * hidden
    decoder = stride4 * per_pixel
    value = Precision(compute=canonical_precision(amp, "amp")).activation_bytes
    return MemoryEstimate(weights, optimizer_bytes, batch_size * value * (backbone + decoder))


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes a run may use on ``device``: the GPU's total memory, or the machine's available memory
    (``MemAvailable``) on the CPU; None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GB"


def _settings_to_change(model: UperNetViT, lora: bool) -> List[str]:
    cfg = model.config
    advice: List[str] = []
    if not getattr(model.backbone.vit, "grad_checkpointing", False):
        advice.append("model.gradient_checkpointing: true (keeps one block's activations instead of all)")
    if not (lora or cfg.freeze_backbone):
        advice.append("lora.enabled: true or model.freeze_backbone: true (no gradients or optimizer state for "
                      "the backbone)")
    if cfg.backbone_dtype == "float32" and (lora or cfg.freeze_backbone):
        advice.append("model.backbone_dtype: bfloat16 (half the backbone's weights)")
    advice.append("a smaller data.batch_size or data.patch_size (activations grow with both; attention with "
                  "the square of the patch's token count)")
    return advice


def check_fits(estimate: MemoryEstimate, available: Optional[int], model: UperNetViT, lora: bool) -> None:
    """A ValueError that names the settings to change when ``estimate`` exceeds ``available``; a logged
    warning that names them when it exceeds :data:`NEAR_LIMIT` of it (the estimate is not a bound)."""
    if available is None or estimate.total <= NEAR_LIMIT * available:
        return
    needs = (f"this run needs about {_gb(estimate.total)} (weights {_gb(estimate.weights)}, gradients and optimizer "
             f"{_gb(estimate.optimizer)}, activations {_gb(estimate.activations)})")
    change = "; ".join(_settings_to_change(model, lora))
    if estimate.total > available:
        raise ValueError(f"{needs} but the device has {_gb(available)}; change: {change}")
    logger.warning("%s, close to the device's %s; the estimate can be about 10%% low, so the run may run out of "
                   "memory; if it does, change: %s", needs, _gb(available), change)
