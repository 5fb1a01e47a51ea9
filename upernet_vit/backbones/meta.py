"""Build a backbone with no weights in memory, then fill it from its checkpoint in the storage dtype.

    with build_on_meta(dtype):
        timm.create_model(...)      parameters on the meta device, in dtype (shapes, no memory); buffers
                                    (RoPE periods, ...) computed as usual
        vit.load_state_dict(file)   each tensor copied, in its parameter's dtype, and assigned: the
                                    copies become the parameters

A DINOv3-7B built the ordinary way holds 27 GB of float32 weights before a ``backbone_dtype: bfloat16``
cast halves them. Built here from a memory-mapped file (``read_checkpoint``), the process holds the
weights once, at 2 bytes each: its own memory peaks at about the bfloat16 size (the file's pages are
the kernel's page cache, dropped under pressure; ``benchmarks/model_memory.py`` measures both). This is torch's own
recipe for large models (meta device, ``torch.load(mmap=True)``, ``load_state_dict(assign=True)``),
applied while timm builds the model and while it, or ``load_backbone_checkpoint``, loads weights.

``from_pretrained`` builds a whole saved model this way from its ``model.safetensors``. Random
initialization needs real tensors, so a backbone with no weights to load is built the ordinary way.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import nn


# torch's own methods, which the swapped-in ones call; the swap lasts while any thread has a block open, and
# each thread's open blocks (their dtypes, innermost last) are its own: other threads build as usual
_REGISTER, _LOAD = nn.Module.register_parameter, nn.Module.load_state_dict
_SWAP_LOCK = threading.Lock()
_open_blocks = [0]  # in all threads
_thread = threading.local()  # .dtypes: this thread's open blocks; .loading: inside an assigning load


def _register_on_meta(module: nn.Module, name: str, param: Any) -> None:
    dtypes = getattr(_thread, "dtypes", None)
    if dtypes and not getattr(_thread, "loading", False) and isinstance(param, nn.Parameter) and not param.is_meta:
        dtype = dtypes[-1] if dtypes[-1] is not None and param.is_floating_point() else param.dtype
        param = nn.Parameter(param.to("meta", dtype), requires_grad=param.requires_grad)
    _REGISTER(module, name, param)


def _load_assigning(module: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                    assign: bool = False) -> Any:
    if not getattr(_thread, "dtypes", None) or not any(p.is_meta for p in module.parameters()):
        return _LOAD(module, state_dict, strict=strict, assign=assign)
    # copying into a meta tensor is a silent no-op: the loaded tensors must become the parameters. Each is a
    # contiguous copy in fresh memory, not a view of the memory-mapped file: no weight changes if the file is
    # overwritten, and kernels see the layout and alignment of an ordinarily built model (the same results)
    own = module.state_dict(keep_vars=True)
    cast: "OrderedDict[str, torch.Tensor]" = OrderedDict(
        (k, v.to(dtype=own[k].dtype if v.is_floating_point() else v.dtype, copy=True,
                 memory_format=torch.contiguous_format) if k in own else v)  # the rest: for torch's strict check
        for k, v in state_dict.items()
    )
    cast._metadata = getattr(state_dict, "_metadata", None)  # type: ignore[attr-defined]  # version info
    _thread.loading = True  # assigning goes through register_parameter
    try:
        return _LOAD(module, cast, strict=strict, assign=True)
    finally:
        _thread.loading = False


@contextmanager
def build_on_meta(dtype: Optional[torch.dtype] = None) -> Iterator[None]:
    """Inside (in this thread): every ``nn.Parameter`` a module registers is put on the meta device (a floating
    one in ``dtype``, when given; the innermost block's, when blocks nest), and ``load_state_dict`` of a
    module that holds meta parameters assigns copies of the given tensors, each in the dtype of the tensor it
    replaces (strictness and error messages are torch's). Assigning unties tied parameters; no ViT, LoRA
    adapter or decoder here ties any."""
    with _SWAP_LOCK:
        if not _open_blocks[0]:
            nn.Module.register_parameter = _register_on_meta  # type: ignore[method-assign]
            nn.Module.load_state_dict = _load_assigning  # type: ignore[method-assign]
        _open_blocks[0] += 1
    dtypes = _thread.__dict__.setdefault("dtypes", [])
    dtypes.append(dtype)
    try:
        yield
    finally:
        dtypes.pop()
        with _SWAP_LOCK:
            _open_blocks[0] -= 1
            if not _open_blocks[0]:
                nn.Module.register_parameter = _REGISTER  # type: ignore[method-assign]
                nn.Module.load_state_dict = _LOAD  # type: ignore[method-assign]


def check_materialized(module: nn.Module, source: str) -> None:
    """A ValueError naming the parameters that ``source`` held no weights for (still on the meta device)."""
    empty = [name for name, p in module.named_parameters() if p.is_meta]
    if empty:
        raise ValueError(
            f"{source} holds no weights for {len(empty)} parameter(s) of the model (e.g. {', '.join(empty[:4])}); "
            f"a model built on the meta device cannot leave them randomly initialized: give weights that hold "
            f"them all, or build it in float32 (backbone_dtype float32), which initializes them at random"
        )
