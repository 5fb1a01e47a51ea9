"""``torch.export`` of the eval model, with dynamic batch, H and W by default."""
from __future__ import annotations

import torch

from ..model import UperNetViT
from .formulations import export_formulations


def export_program(model: UperNetViT, example: torch.Tensor, dynamic: bool = True) -> "torch.export.ExportedProgram":
    """``torch.export.export(model, (example,))`` with the export formulations (:mod:`.formulations`), so
    that with ``dynamic=True`` (batch, H and W symbolic) the program is correct at every input size, not
    only the example's. Traced in eval mode without autograd; ``model`` is left as it was.

    ``example [B, in_chans, H, W]`` with B >= 2 and H, W > 2 patches when dynamic: a size-1 axis or a 1-px
    map would be traced as a constant.
    """
    dim = torch.export.Dim.DYNAMIC
    axes = {"x": {0: dim, 2: dim, 3: dim}} if dynamic else None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), export_formulations(model):
            return torch.export.export(model, (example,), dynamic_shapes=axes)
    finally:
        model.train(was_training)
