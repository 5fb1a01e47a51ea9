"""Fully sharded data parallel training (``train.distributed: fsdp``) with torch's FSDP2, ``fully_shard``.

Under DDP each GPU holds the whole model, its gradients and its optimizer state (AdamW: 16 bytes per
float32 parameter), so full fine-tuning of a large backbone may not fit one GPU. FSDP shards all three
across the N processes: each keeps 1/N of every parameter (a ``DTensor`` sharded on dim 0) with its
gradient and optimizer state, and all-gathers a module's full weights just before that module runs
(forward, and again in backward), freeing them afterwards.

What is sharded, in which units, and why:

- each ViT block (``backbone.vit.blocks[i]``; also when a peft ``LoraModel`` wraps the ViT), an FSDP unit
  of its own: the blocks hold nearly all the weights, all of one size, so only about one block's full
  weights exist at a time beside the shards; gathered again in backward (``reshard_after_forward``).
- the whole model, the root unit: the rest (patch embedding, tokens, final norm, pyramid, head,
  upsampler) is gathered once per forward and kept until backward, which needs it first.

Mixed precision: with ``train.amp: bf16`` the blocks' gathered weights (and so their compute, the residual
stream included) are bfloat16, and their gradients are reduced in float32 into the float32 shards, which
stay the optimizer's master weights; the root unit is gathered in float32 and autocast computes it as under
DDP (the decoder's norms and output in float32). With ``none`` everything is float32 and the results match
DDP's up to the order of the sums.

Checkpoints are those of one process: :func:`gather_model_state` and :func:`gather_optimizer_state`
collect full tensors on rank 0 (on the CPU, one tensor at a time), in ``model.state_dict()`` keys and
``optimizer.state_dict()`` numbering; :func:`load_model_state` and :func:`load_optimizer_state` put full
tensors back into the shards. So ``from_pretrained`` loads the folder, and a run can resume on another
number of processes.

Every function here is collective: all ranks call it, in the same order.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)

# the blocks give their gathered weights back after forward (memory); the root keeps its own for backward
RESHARD_BLOCKS, RESHARD_ROOT = True, False


def vit_blocks(model: nn.Module) -> List[nn.Module]:
    """The transformer blocks of ``model.backbone``, in order: the children of each ``blocks`` container
    (timm's ``nn.Sequential``; found by name, so a peft ``LoraModel`` around the ViT does not hide them)."""
    blocks: List[nn.Module] = []
    containers: List[str] = []
    for name, module in model.backbone.named_modules():
        nested = any(name.startswith(c + ".") for c in containers)  # a container inside a block: its block is the unit
        if name.rsplit(".", 1)[-1] == "blocks" and isinstance(module, (nn.Sequential, nn.ModuleList)) and not nested:
            containers.append(name)
            blocks.extend(module.children())
    return blocks


def shard_model(model: nn.Module, device: torch.device, world_size: int,
                mixed_precision: Optional[torch.dtype] = None) -> nn.Module:
    """Shard ``model`` in place across the ``world_size`` processes of the default group, on ``device``:
    each ViT block, then the root (module docstring). ``mixed_precision``: the dtype the blocks' weights are
    gathered and computed in (``torch.bfloat16`` for ``train.amp: bf16``; their gradients are reduced in
    float32), None for float32; the root's are gathered in float32 (autocast computes it as under DDP).
    Returns ``model``, now also an ``FSDPModule``; build the optimizer after this call."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,))  # explicit: a CUDA machine may train on the CPU
    policy = (MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
              if mixed_precision is not None else MixedPrecisionPolicy())
    blocks = vit_blocks(model)
    if not blocks:
        logger.warning("fsdp: no ViT blocks found in the backbone; sharding the model as one unit")
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=RESHARD_BLOCKS)
    # the root in float32: the decoder, the norms outside the blocks and the model's output keep the float32
    # weights (autocast picks each op's dtype, as under DDP and in predict)
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(), reshard_after_forward=RESHARD_ROOT)
    logger.info("fsdp: %d blocks and the root sharded across %d processes (blocks' weights in %s in compute)",
                len(blocks), world_size, mixed_precision or torch.float32)
    return model


@contextmanager
def full_weights(model: nn.Module) -> Iterator[None]:
    """Inside, every rank holds all of ``model``'s weights (in the compute dtype), so a forward gathers
    nothing and ranks may run different numbers of forwards (each validates its own cases). Gathers
    on entry (collective), frees on exit (local). Memory: the whole model's weights per GPU."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    model.set_reshard_after_forward(False)  # type: ignore[operator]  # recursive: forwards keep the weights
    try:
        for unit in units:  # the same order on every rank
            unit.unshard()
        yield
    finally:
        for unit in units:
            unit.reshard()
        model.set_reshard_after_forward(RESHARD_BLOCKS)  # type: ignore[operator]
        model.set_reshard_after_forward(RESHARD_ROOT, recurse=False)  # type: ignore[operator]


def global_grad_norm(norm: torch.Tensor) -> torch.Tensor:
    """``clip_grad_norm_``'s result as a plain tensor: over sharded parameters it is a DTensor holding
    the norm of all the gradients, not of this rank's shards."""
    from torch.distributed.tensor import DTensor

    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def _full_options(**options: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **options)


def gather_model_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``model.state_dict()`` of the unsharded model (same keys, full CPU tensors) on rank 0; ``{}``
    on the other ranks."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options(cpu_offload=True))


def _optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> List[str]:
    """The name of each optimizer parameter, in the order ``optimizer.state_dict()`` numbers them."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """``optimizer.state_dict()`` as one process holding the whole model would have it (full CPU tensors,
    parameters numbered in param-group order) on rank 0; ``{}`` on the other ranks."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    if dist.get_rank() != 0:
        return {}
    index = {name: i for i, name in enumerate(n for group in full["param_groups"] for n in group["params"])}
    return {
        "state": {index[name]: value for name, value in full["state"].items()},
        "param_groups": [{**group, "params": [index[n] for n in group["params"]]} for group in full["param_groups"]],
    }


def load_model_state(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Load the full ``state`` (``model.state_dict()`` keys; every rank passes the same) into the shards;
    missing or unexpected keys are an error."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, dict(state), options=_full_options())  # it rewrites the dict it is given


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """Load a one-process ``optimizer.state_dict()`` (:func:`gather_optimizer_state`'s; every rank passes
    the same) into the sharded optimizer state."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _optimizer_names(model, optimizer)
    full = {
        "state": {names[int(i)]: value for i, value in state["state"].items()},
        "param_groups": [{**group, "params": [names[int(i)] for i in group["params"]]}
                         for group in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, full, options=_full_options())
