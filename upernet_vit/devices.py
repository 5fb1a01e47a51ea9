"""Which device a command runs on: ``auto``/``cpu``/``cuda``/``cuda:N``, checked against this machine."""
from __future__ import annotations

from typing import Optional

import torch


def resolve_device(name: str, local_rank: Optional[int] = None, option: str = "train.device") -> torch.device:
    """``auto``/``cpu``/``cuda``/``cuda:N``; under DDP (``local_rank`` given) each process takes GPU
    ``local_rank``. A device this machine does not have (or a name torch does not know) is a ValueError
    naming ``option``, the flag or key it came from."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{option} {name!r} is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = local_rank if local_rank is not None else (device.index or 0)
        if index >= count:
            raise ValueError(
                f"{option} is {name!r} but this machine has "
                + (f"{count} CUDA device(s) (0..{count - 1})" if count else "no CUDA device (or torch was built without CUDA)")
                + "; use 'cpu' or 'auto'"
            )
        return torch.device(f"cuda:{index}")
    if device.type not in ("cpu", "cuda"):
        if device.type == "mps" and torch.backends.mps.is_available():
            return device
        raise ValueError(f"{option} {name!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return device
