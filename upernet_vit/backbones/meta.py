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
applied while timm builds the model and while it, or ``load_backbone_checkpoint``, loads weights. Only
torch's public mechanisms are used: its parameter- and module-registration hooks put parameters on the
meta device (not ``with torch.device("meta")``, which would put the buffers timm computes at build time,
such as RoPE periods that no file holds, there too), and loading assigns. Nothing of ``nn.Module`` is
replaced: other threads, and this one after the block, build as usual.

``from_pretrained`` builds a whole saved model this way from its ``model.safetensors``. Random
initialization needs real tensors, so a backbone with no weights to load is built the ordinary way.
"""
from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Iterator, List, Mapping, Optional

import torch
from torch import nn
from torch.nn.modules.module import (register_module_module_registration_hook,
                                     register_module_parameter_registration_hook)

# torch's registration hooks are process-wide; they stay registered while any thread has a block open and
# act only in a thread that has one (its open blocks' dtypes, innermost last): other threads build as usual
_HOOK_LOCK = threading.Lock()
_hooks: List[Any] = []  # the two hooks' handles while any block is open
_open_blocks = [0]  # in all threads
_thread = threading.local()  # .dtypes: open blocks; .loading: inside an assigning load; .patched: see below


def _in_block() -> bool:
    return bool(getattr(_thread, "dtypes", None))


def _assign_on_load(module: nn.Module) -> None:
    """Give ``module``, built in this block, a ``load_state_dict`` that assigns (:func:`load_assigned`) until
    the block closes. An attribute of the instance, not of ``nn.Module``: timm's pretrained loader calls
    ``model.load_state_dict(state, strict=...)`` itself, with no way to ask for ``assign=True``."""
    if "load_state_dict" not in module.__dict__:
        module.__dict__["load_state_dict"] = functools.partial(load_assigned, module)
        _thread.patched.append(module)


def _on_parameter(module: nn.Module, name: str, param: Any) -> Optional[nn.Parameter]:
    if not _in_block() or getattr(_thread, "loading", False) or not isinstance(param, nn.Parameter) or param.is_meta:
        return None
    _assign_on_load(module)
    dtypes = _thread.dtypes
    dtype = dtypes[-1] if dtypes[-1] is not None and param.is_floating_point() else param.dtype
    return nn.Parameter(param.to("meta", dtype), requires_grad=param.requires_grad)


def _on_submodule(module: nn.Module, name: str, submodule: Optional[nn.Module]) -> None:
    if _in_block():  # a container (nn.Sequential, the root model) loads its children's parameters
        _assign_on_load(module)


def load_assigned(module: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                  assign: bool = False) -> Any:
    """``module.load_state_dict(state_dict, strict)``; when ``module`` holds meta parameters, each given tensor
    is copied in the dtype of the parameter it replaces and assigned (``assign=True``): copying into a meta
    tensor is a silent no-op. Each copy is contiguous, in fresh memory, not a view of a memory-mapped file: no
    weight changes if the file is overwritten, and kernels see the layout of an ordinarily built model."""
    if not _in_block():  # a copy (deepcopy) of a module built in a block, used after it: torch's own load
        module.__dict__.pop("load_state_dict", None)
        return nn.Module.load_state_dict(module, state_dict, strict=strict, assign=assign)
    if not any(p.is_meta for p in module.parameters()):
        return nn.Module.load_state_dict(module, state_dict, strict=strict, assign=assign)
    own = module.state_dict(keep_vars=True)
    cast: "OrderedDict[str, torch.Tensor]" = OrderedDict(
        (k, v.to(dtype=own[k].dtype if v.is_floating_point() else v.dtype, copy=True,
                 memory_format=torch.contiguous_format) if k in own else v)  # the rest: for torch's strict check
        for k, v in state_dict.items()
    )
    cast._metadata = getattr(state_dict, "_metadata", None)  # type: ignore[attr-defined]  # version info
    _thread.loading = True  # assigning registers each tensor as a parameter: it must stay where it is
    try:
        return nn.Module.load_state_dict(module, cast, strict=strict, assign=True)
    finally:
        _thread.loading = False


@contextmanager
def build_on_meta(dtype: Optional[torch.dtype] = None) -> Iterator[None]:
    """Inside (in this thread): every ``nn.Parameter`` a module registers is put on the meta device (a floating
    one in ``dtype``, when given; the innermost block's, when blocks nest), through torch's public
    registration hook; and ``load_state_dict`` of a module built here assigns (:func:`load_assigned`;
    strictness and error messages are torch's). Assigning unties tied parameters; no ViT, LoRA adapter or
    decoder here ties any."""
    with _HOOK_LOCK:
        if not _open_blocks[0]:
            _hooks[:] = [register_module_parameter_registration_hook(_on_parameter),
                         register_module_module_registration_hook(_on_submodule)]
        _open_blocks[0] += 1
    dtypes = _thread.__dict__.setdefault("dtypes", [])
    patched = _thread.__dict__.setdefault("patched", [])
    dtypes.append(dtype)
    try:
        yield
    finally:
        dtypes.pop()
        if not dtypes:  # this thread's outermost block: its modules load as usual again
            for module in patched:
                module.__dict__.pop("load_state_dict", None)
            patched.clear()
        with _HOOK_LOCK:
            _open_blocks[0] -= 1
            if not _open_blocks[0]:
                for handle in _hooks:
                    handle.remove()
                _hooks.clear()


def check_materialized(module: nn.Module, source: str) -> None:
    """A ValueError naming the parameters that ``source`` held no weights for (still on the meta device)."""
    empty = [name for name, p in module.named_parameters() if p.is_meta]
    if empty:
        raise ValueError(
            f"{source} holds no weights for {len(empty)} parameter(s) of the model (e.g. {', '.join(empty[:4])}); "
            f"a model built on the meta device cannot leave them randomly initialized: give weights that hold "
            f"them all, or build it in float32 (backbone_dtype float32), which initializes them at random"
        )
