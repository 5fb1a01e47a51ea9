"""Size-generic helpers, correct for eager sizes and for the symbolic sizes of ``torch.export`` (also the
ONNX exporter), where a Python branch on a size would fix the traced graph to the example's."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

try:  # torch >= 2.3: True only where provable without adding a guard; plain bools pass through
    from torch.fx.experimental.symbolic_shapes import statically_known_true
except ImportError:  # pragma: no cover
    def statically_known_true(x: bool) -> bool:  # type: ignore[misc]
        return bool(x)


def is_exporting() -> bool:
    """True while ``torch.export`` traces the model (torch >= 2.7; always False before)."""
    return bool(getattr(torch.compiler, "is_exporting", lambda: False)())


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize to an explicit target size (never a scale factor, so odd grids stay exact).

    ``align_corners=False`` as in mmsegmentation and HuggingFace. Same size: ``x`` itself, unless the sizes
    are symbolic (``torch.export``) and not provably equal; then the interpolation, which is exact at scale 1.
    """
    if statically_known_true(x.shape[-2] == size[0]) and statically_known_true(x.shape[-1] == size[1]):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
