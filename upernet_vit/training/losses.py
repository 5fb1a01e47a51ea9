"""Cross-entropy + soft Dice (nnU-Net's ``DC_and_CE_loss``), with an ignore label."""
from __future__ import annotations

import logging
from typing import Iterable, List, Literal, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.datasets import IGNORE_INDEX

logger = logging.getLogger(__name__)


class SoftDiceLoss(nn.Module):
    """``1 - mean_c dice_c`` over foreground classes on softmax probabilities.

    ``batch_dice=True`` sums TP/FP/FN over the whole batch before dividing (nnU-Net's 2D default),
    which is stable when a class is absent from single images. Ignored pixels count for nothing.
    """

    def __init__(self, smooth: float = 1e-5, batch_dice: bool = True, include_background: bool = False) -> None:
        super().__init__()
        self.smooth = smooth
        self.batch_dice = batch_dice
        self.include_background = include_background

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits [B, K, H, W]``, ``target [B, H, W]`` class indices (``IGNORE_INDEX`` allowed)."""
        probs = logits.float().softmax(dim=1)
        valid = (target != IGNORE_INDEX).unsqueeze(1)
        onehot = F.one_hot(target.clamp_min(0), probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
        probs, onehot = probs * valid, onehot * valid
        dims = (0, 2, 3) if self.batch_dice else (2, 3)
        tp = (probs * onehot).sum(dims)
        fp = (probs * (1 - onehot)).sum(dims)
        fn = ((1 - probs) * onehot).sum(dims)
        dice = (2 * tp + self.smooth) / (2 * tp + fp + fn + self.smooth).clamp_min(1e-8)
        if not self.include_background:
            dice = dice[..., 1:]
        return 1 - dice.mean()


class DiceCELoss(nn.Module):
    """``ce_weight * CE + dice_weight * (1 - soft Dice)``; ``IGNORE_INDEX`` pixels are excluded from both.

    ``class_weights`` ``[K]`` weight the CE term per target class (PyTorch's weighted mean: the sum of
    ``w[y_i] * ce_i`` over the sum of ``w[y_i]``); the Dice term is unweighted."""

    def __init__(
        self, ce_weight: float = 1.0, dice_weight: float = 1.0, batch_dice: bool = True,
        class_weights: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__()
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.dice = SoftDiceLoss(batch_dice=batch_dice)
        weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if (target != IGNORE_INDEX).any():
            ce = F.cross_entropy(logits.float(), target, weight=self.class_weights, ignore_index=IGNORE_INDEX)
        else:  # all ignored: CE would be NaN; keep the graph, contribute nothing
            ce = logits.sum() * 0.0
        return self.ce_weight * ce + self.dice_weight * self.dice(logits, target)


def segmentation_loss(
    criterion: nn.Module,
    logits: torch.Tensor,
    target: torch.Tensor,
    aux_logits: Optional[torch.Tensor] = None,
    aux_weight: float = 0.4,
) -> torch.Tensor:
    """Main loss plus ``aux_weight`` times the auxiliary head's (mmseg's 0.4 by default)."""
    loss = criterion(logits, target)
    if aux_logits is not None:
        loss = loss + aux_weight * criterion(aux_logits, target)
    return loss


def inverse_frequency_weights(labels: Iterable[torch.Tensor], num_classes: int) -> List[float]:
    """``train.class_weights: auto``: ``w_c = N / (K * n_c)`` over the labelled pixels of ``labels``
    (scikit-learn's "balanced": a class with the average share gets 1). A class with no pixel gets 1.0:
    it is never a CE target, so its weight has no effect."""
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for label in labels:
        valid = label[label != IGNORE_INDEX]
        counts += torch.bincount(valid.flatten(), minlength=num_classes)[:num_classes].double()
    total = counts.sum()
    return [float(total / (num_classes * n)) if n > 0 else 1.0 for n in counts.tolist()]


def class_weights(
    wanted: Union[None, Literal["auto"], Sequence[float]], label_names: Sequence[str], labels: Iterable[np.ndarray]
) -> Optional[List[float]]:
    """``train.class_weights`` for the CE term: None, checked against the classes (``label_names``,
    background first), or ``auto`` computed from the training ``labels`` (read one at a time) and logged."""
    if wanted is None:
        return None
    if wanted == "auto":
        weights = inverse_frequency_weights((torch.from_numpy(label) for label in labels), len(label_names))
        logger.info("train.class_weights auto (inverse pixel frequency of the training cases): %s",
                    ", ".join(f"{n} {w:.3g}" for n, w in zip(label_names, weights)))
        return weights
    if len(wanted) != len(label_names):
        raise ValueError(
            f"train.class_weights has {len(wanted)} values but the dataset has {len(label_names)} classes "
            f"{list(label_names)} (background included): give one weight per class"
        )
    return list(wanted)
