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

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import nn


@contextmanager
def build_on_meta(dtype: Optional[torch.dtype] = None) -> Iterator[None]:
    """Inside: every ``nn.Parameter`` a module registers is put on the meta device (a floating one in
    ``dtype``, when given), and ``load_state_dict`` of a module that holds meta parameters assigns the
    given tensors, each cast to the dtype of the tensor it replaces (strictness and error messages are
    torch's). Not thread-safe: it swaps two ``nn.Module`` methods for the duration of the block."""
    register, load = nn.Module.register_parameter, nn.Module.load_state_dict
    loading = []  # non-empty while load_state_dict assigns (through register_parameter)

    def register_on_meta(module: nn.Module, name: str, param: Any) -> None:
        if isinstance(param, nn.Parameter) and not param.is_meta and not loading:
            to = dtype if dtype is not None and param.is_floating_point() else param.dtype
            param = nn.Parameter(param.to("meta", to), requires_grad=param.requires_grad)
        register(module, name, param)

    def load_assigning(module: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True,
                       assign: bool = False) -> Any:
        if not any(p.is_meta for p in module.parameters()):
            return load(module, state, strict=strict, assign=assign)
        # copying into a meta tensor is a silent no-op: the loaded tensors must become the parameters. Each is
        # a copy in fresh memory, not a view of the memory-mapped file: no weights change if the file is
        # overwritten, and kernels see the alignment they get from an ordinarily built model (same results)
        own = module.state_dict(keep_vars=True)
        cast = {k: v.to(own[k].dtype if k in own and v.is_floating_point() else v.dtype, copy=True)
                for k, v in state.items()}
        loading.append(module)
        try:
            return load(module, cast, strict=strict, assign=True)
        finally:
            loading.pop()

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    nn.Module.load_state_dict = load_assigning  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]
        nn.Module.load_state_dict = load  # type: ignore[method-assign]


def check_materialized(module: nn.Module, source: str) -> None:
    """A ValueError naming the parameters that ``source`` held no weights for (still on the meta device)."""
    empty = [name for name, p in module.named_parameters() if p.is_meta]
    if empty:
        raise ValueError(
            f"{source} holds no weights for {len(empty)} parameter(s) of the model (e.g. {', '.join(empty[:4])}); "
            f"give a file that holds them all"
        )
