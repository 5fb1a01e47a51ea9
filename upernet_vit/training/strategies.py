"""How the processes of a run share the work: one object per way of running, so the loop has no branch.

    OneProcess   no torchrun (or WORLD_SIZE 1): the model on one device
    DDP          train.distributed: ddp under torchrun: a whole model per process, gradients averaged
    FSDP         train.distributed: fsdp under torchrun: weights, gradients and optimizer state sharded
                 (fsdp.py has the mechanics)

A strategy owns what differs between them: the process group's lifetime (``start`` .. ``close``), putting
the model on its device (``place``) and wrapping it (``wrap``), the weights evaluation runs with
(``evaluation_weights``), the gradient norm, the state a checkpoint is written from (``gather_weights``,
``gather_optimizer``) and loaded into (``load_state``), its share of the memory estimate (``per_process``), and the collectives the
loop needs (``all_reduce_sum``, ``barrier``, ``agree``). Every strategy writes the same run folder: the full
weights and a one-process optimizer state, written by rank 0.
"""
from __future__ import annotations

import dataclasses
import os
from contextlib import nullcontext
from typing import Any, ContextManager, Dict, List, Optional

import torch
from torch import nn
from torch.utils.data import Dataset, DistributedSampler, Sampler

from ..config import TrainConfig
from ..precision import Precision
from ..runs.run_folder import RunFolder
from . import distributed
from .distributed import DistInfo
from .memory import MemoryEstimate


class OneProcess:
    """One process, one device: the base every strategy refines."""

    def __init__(self, precision: Precision, note: str = "one process") -> None:
        self.precision = precision
        self.info = DistInfo()
        self.note = note  # how the run shares the work, for the log

    # ------------------------------------------------------------------ lifetime
    def start(self, device_type: str) -> DistInfo:
        """Join the process group (if any); returns this process's rank and the world size."""
        return self.info

    def close(self) -> None:
        """Leave the process group (if any); safe to call twice."""

    # ------------------------------------------------------------------ the model
    def place(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``model`` on ``device``, before the fast paths are swapped in and before :meth:`wrap`."""
        return model.to(device)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """What the training step calls (``model`` itself here); build the optimizer after this call."""
        return model

    def evaluation_weights(self, model: nn.Module) -> ContextManager[None]:
        """Around evaluation passes, in which ranks may run different numbers of forwards."""
        return nullcontext()

    def grad_norm(self, norm: torch.Tensor) -> torch.Tensor:
        """``clip_grad_norm_``'s result as the norm of all the model's gradients, a plain tensor."""
        return norm

    def per_process(self, estimate: MemoryEstimate) -> MemoryEstimate:
        """The memory one process needs, from the estimate of a one-process step on its share of the batch."""
        return estimate

    def sampler(self, dataset: Dataset) -> Optional[Sampler]:
        """This rank's part of ``dataset`` (None: all of it)."""
        return None

    # ------------------------------------------------------------------ checkpoints
    def gather_weights(self, model: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
        """The weights as one process holds them, for a checkpoint; None: the model's own ``state_dict()``."""
        return None

    def gather_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
        """The optimizer state as one process holds it (gathered after the weights passed their check)."""
        return optimizer.state_dict()

    def load_state(self, folder: RunFolder, model: nn.Module, optimizer: torch.optim.Optimizer,
                   device: torch.device) -> Dict[str, Any]:
        """Load ``folder``'s latest checkpoint into ``model`` and ``optimizer``; returns its training state."""
        state = folder.read_for_resume(model, device)
        optimizer.load_state_dict(state["optimizer"])
        return state

    # ------------------------------------------------------------------ collectives
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes, in place (itself in one process)."""
        return distributed.all_reduce_sum(tensor, self.info)

    def barrier(self) -> None:
        """Wait until every process gets here (nothing to wait for in one process)."""
        distributed.barrier(self.info)

    def agree(self, verdict: List[str]) -> List[str]:
        """Every rank's copy of a verdict on the weights (they are the same everywhere: its own)."""
        return verdict


class DDP(OneProcess):
    """torchrun processes, each with the whole model; DistributedDataParallel averages the gradients."""

    def start(self, device_type: str) -> DistInfo:
        """Join torchrun's process group, starting it unless the caller already has (then it stays theirs)."""
        self.owns_group = not torch.distributed.is_initialized()
        self.info = distributed.init_distributed(device_type)
        return self.info

    def close(self) -> None:
        """Leave the process group this strategy started; one the caller started stays up."""
        if getattr(self, "owns_group", False):
            distributed.cleanup(self.info)
            self.owns_group = False

    def place(self, model: nn.Module, device: torch.device) -> nn.Module:
        """On a GPU BatchNorm becomes SyncBatchNorm (statistics over the global batch), then as one process."""
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return super().place(model, device)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def sampler(self, dataset: Dataset) -> Optional[Sampler]:
        return DistributedSampler(dataset, self.info.world_size, self.info.rank, shuffle=False)


class FSDP(DDP):
    """torchrun processes, each keeping 1/N of the weights, gradients and optimizer state (fsdp.py)."""

    def place(self, model: nn.Module, device: torch.device) -> nn.Module:
        """Left where it is: :meth:`wrap` moves each rank's shards to ``device``, so the whole model need not
        fit one GPU."""
        return nn.SyncBatchNorm.convert_sync_batchnorm(model) if device.type == "cuda" else model

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """Shard ``model`` in place; it is its own wrapper. The optimizer must be built after this, on the
        sharded parameters."""
        from .fsdp import shard_model

        return shard_model(model, device, self.info.world_size, self.precision.compute_dtype)

    def evaluation_weights(self, model: nn.Module) -> ContextManager[None]:
        """A forward of the sharded model is collective (each unit all-gathers its weights), so ranks that run
        different numbers of forwards would wait on each other for ever, and whole-image validation does: each
        rank has its own cases, each cut into as many windows as its size needs. So the full weights are
        gathered once for the pass (memory for the whole model on each GPU, as inference needs anyway)."""
        from .fsdp import full_weights

        return full_weights(model)

    def grad_norm(self, norm: torch.Tensor) -> torch.Tensor:
        from .fsdp import global_grad_norm

        return global_grad_norm(norm)

    def per_process(self, estimate: MemoryEstimate) -> MemoryEstimate:
        """1/N of the weights, gradients and optimizer state; evaluation gathers all the weights
        (``evaluation_weights``), counted in full too: erring high."""
        world = self.info.world_size
        return dataclasses.replace(estimate, weights=estimate.weights // world + estimate.weights,
                                   optimizer=estimate.optimizer // world)

    def gather_weights(self, model: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
        """Full tensors gathered from the shards by every rank (collective), kept on rank 0 (``{}`` elsewhere)."""
        from .fsdp import gather_model_state

        return gather_model_state(model)

    def gather_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
        """The one-process optimizer state from the shards (collective), on rank 0 (``{}`` elsewhere)."""
        from .fsdp import gather_optimizer_state

        return gather_optimizer_state(model, optimizer)

    def load_state(self, folder: RunFolder, model: nn.Module, optimizer: torch.optim.Optimizer,
                   device: torch.device) -> Dict[str, Any]:
        """The full tensors, read by every rank on the CPU, go into each rank's shards."""
        from .fsdp import load_model_state, load_optimizer_state

        state = folder.read_for_resume(model, torch.device("cpu"), lambda weights: load_model_state(model, weights))
        load_optimizer_state(model, optimizer, state["optimizer"])
        return state

    def agree(self, verdict: List[str]) -> List[str]:
        """Rank 0 judged the gathered weights (the others hold none): its verdict for every rank."""
        return distributed.broadcast_object(verdict, self.info)


def create_strategy(train: TrainConfig, precision: Precision) -> OneProcess:
    """The strategy ``train.distributed`` asks for, given how many processes torchrun started
    (``WORLD_SIZE``); nothing is started yet (:meth:`OneProcess.start`)."""
    if train.distributed == "fsdp" and precision.grad_scaler:  # before any process starts its group
        raise ValueError(
            "train.amp fp16 does not work with train.distributed fsdp (the GradScaler would judge each "
            "rank's gradient shards alone and the ranks could skip different steps); use train.amp bf16"
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return OneProcess(precision, "one process" if train.distributed != "fsdp" else (
            "train.distributed fsdp: one process trains the whole model, as without it; fsdp shards only "
            "under torchrun with several processes"))
    if train.distributed == "fsdp":
        return FSDP(precision, f"fsdp: {world} processes, each with 1/{world} of the weights")
    return DDP(precision, f"ddp: {world} processes, each with the whole model")
