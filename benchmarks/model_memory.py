"""Peak training memory of a whole UperNetViT step: our head (the reference, and after
``upernet_vit.fast.optimize``) against HuggingFace's, and backbone gradient checkpointing.

    python benchmarks/model_memory.py [--backbone vit_base_patch16_224 --image 512 --batch 2]

Variants (same backbone and pyramid; the head's math is the same, BatchNorm as in HF's head; weight
values do not change memory, so each head keeps its own random init):
- ``hf head``: the model with transformers' ``UperNetHead`` in place of ours
- ``reference``: the model as built (resize, concat, conv)
- ``train default``: after ``optimize(model)`` in training mode, the fast paths ``upernet-vit train``
  applies on the CPU (recompute_upsampled; no channels_last)
- ``train default + winograd``: and Winograd 3x3 convs (CPU fp32; ``upernet-vit train --winograd``)
- ``train default + checkpointing``: and ``gradient_checkpointing=True`` (timm ``set_grad_checkpointing``)
- ``train default, layernorm``: our default decoder norm (not loadable into HF's head)

Each variant runs in its own process; the figure is the process's peak resident memory during one
forward+backward minus its resident memory just before (CPU). The children run with glibc's
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors go back to the OS at once and the peak resident
memory is the peak of live tensors, not of what the allocator kept cached. Random weights; nothing
downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Callable, Dict, List

VARIANTS = ("hf head", "reference", "train default", "train default + winograd", "train default + checkpointing",
            "train default, layernorm")


def _rss_mb() -> float:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(step: Callable[[], object]) -> Dict[str, float]:
    """Run ``step`` once: its peak resident memory beyond what was resident before (MB), and its time (s)."""
    before = _rss_mb()
    start = time.perf_counter()
    step()
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_mb": peak - before, "seconds": elapsed}


def run_child(cmd: List[str]) -> Dict[str, float]:
    """The JSON row a child process prints last, run so that freed tensors go back to the OS at once."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def one_step(args: argparse.Namespace) -> None:
    import torch
    from torch import nn

    from upernet_vit import UperNetViT

    torch.manual_seed(0)
    model = UperNetViT(
        args.backbone, args.size, 4,
        norm="layernorm" if args.variant.endswith("layernorm") else "batchnorm",
        gradient_checkpointing=args.variant.endswith("checkpointing"),
        dropout=0.0,  # HF's head has none; ours would keep one more [B, C, H/4, W/4] map for it
    ).train()
    if args.variant == "hf head":
        from transformers import UperNetConfig
        from transformers.models.upernet.modeling_upernet import UperNetHead as HFUperNetHead

        class HFHead(nn.Module):
            def __init__(self, head: nn.Module) -> None:
                super().__init__()
                self.head = head

            def forward(self, features, return_aux=False):
                return self.head(list(features))

        config = UperNetConfig(hidden_size=model.head.channels, pool_scales=[1, 2, 3, 6], num_labels=4)
        model.head = HFHead(HFUperNetHead(config, list(model.head.in_channels)))
    elif args.variant.startswith("train default"):
        from upernet_vit.fast import optimize
        optimize(model.train(), winograd=args.variant.endswith("winograd"))
    x = torch.randn(args.batch, 3, args.image, args.image)
    print(json.dumps(measure(lambda: model(x).square().mean().backward())))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="vit_base_patch16_224", help="preset or timm ViT name")
    parser.add_argument("--size", default=None, help="preset size, e.g. base (none for a timm name)")
    parser.add_argument("--image", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        one_step(args)
        return
    print(f"# {args.backbone} {args.size or ''}, {args.image} px, batch {args.batch}, one training step (CPU)")
    print("| variant | step memory (MB) | x of HF head | step time (s) |\n|---|---|---|---|")
    rows = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--backbone", args.backbone,
               "--image", str(args.image), "--batch", str(args.batch)] + (["--size", args.size] if args.size else [])
        rows[variant] = row = run_child(cmd)
        print(f"| {variant} | {row['step_mb']:.0f} | {row['step_mb'] / rows['hf head']['step_mb']:.2f} "
              f"| {row['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
