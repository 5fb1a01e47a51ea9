"""Training throughput (images/s) of a config on this machine: forward+backward+step on its patches.

    python benchmarks/train_throughput.py configs/demo.yaml [--iterations 30] [--amp none,bf16] [--reference]
                                          [-o KEY=VALUE ...] [--device cpu|cuda] [--hf-head]

The model gets the fast paths ``upernet-vit train`` applies (``optimize(model)`` in training mode on this
device); ``--reference`` times
the model as built.

Prints one table row per AMP mode, with the fp32 row as the reference for the speed-up column.
Data loading is excluded (batches are prepared first); the first 5 iterations are warm-up.

``-o KEY=VALUE`` overrides a config key as ``upernet-vit train -o`` does (``-o model.backbone_size=base``);
``--device cuda`` trains on the GPU (batches moved there first, timing waits for the GPU's work).
``--hf-head`` compares the whole model against the same model with transformers' ``UperNetHead`` in place
of ours (same backbone and pyramid, random weights): rows ``HF head``, ``ours, batchnorm, no dropout`` (HF's
head's math, with our fast paths) and ``ours, as configured`` (the config's decoder, e.g. LayerNorm), each
per AMP mode, with images/s relative to the HF head and, on CUDA, ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import List, Optional

import torch
from torch import nn

from upernet_vit.config import load_config
from upernet_vit.config import AugmentationConfig
from upernet_vit.data.augment import PatchDataset
from upernet_vit.data.normalization import Normalizer
from upernet_vit.data.demo import demo_cases
from upernet_vit.training.losses import DiceCELoss
from upernet_vit.training.optim import build_optimizer
from upernet_vit import UperNetViT
from upernet_vit.fast import optimize

from timing import device_name  # benchmarks/timing.py


class HFHead(nn.Module):
    """transformers' ``UperNetHead`` with our head's call signature (the model upsamples its logits)."""

    def __init__(self, ours: nn.Module, num_classes: int) -> None:
        super().__init__()
        from transformers import UperNetConfig
        from transformers.models.upernet.modeling_upernet import UperNetHead as HFUperNetHead

        config = UperNetConfig(hidden_size=ours.channels, pool_scales=list(ours.ppm.pool_scales), num_labels=num_classes)
        self.head = HFUperNetHead(config, list(ours.in_channels))

    def forward(self, features, return_aux=False):
        return self.head(list(features))


def _config(config_path: str, overrides: Optional[List[str]]):
    if not overrides:
        return load_config(config_path)
    from upernet_vit.cli import _apply_overrides
    from upernet_vit.config import read_yaml
    from upernet_vit.recipes import resolve_config

    return load_config(_apply_overrides(read_yaml(resolve_config(config_path)) or {}, list(overrides)))


def run(config_path: str, iterations: int, amp: str, reference: bool = False, overrides: Optional[List[str]] = None,
        device: str = "cpu", hf_head: bool = False) -> float:
    cfg = _config(config_path, overrides)
    torch.manual_seed(0)
    model = UperNetViT.from_config(cfg, num_classes=4, in_chans=1)
    if hf_head:
        model.head = HFHead(model.head, num_classes=4)
    dev = torch.device(device)
    model.to(dev)
    if not reference and not hf_head:
        optimize(model.train())
    data = cfg.data
    cases = demo_cases(16, data.demo_image_size)
    ds = PatchDataset(cases, data.patch_size, Normalizer(model.mean, model.std), iterations * data.batch_size, 0, AugmentationConfig())
    batches = [
        (torch.stack([ds[i * data.batch_size + j][0] for j in range(data.batch_size)]).to(dev),
         torch.stack([ds[i * data.batch_size + j][1] for j in range(data.batch_size)]).to(dev))
        for i in range(iterations)
    ]
    optimizer = build_optimizer(model, cfg.train, model.backbone.depth)
    criterion = DiceCELoss()
    dtype = {"bf16": torch.bfloat16}.get(amp)
    model.train()
    warmup = 5
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elapsed = time.perf_counter() - start
    return (iterations - warmup) * data.batch_size / elapsed


def hf_table(args: argparse.Namespace) -> None:
    """``--hf-head``: the HF-head model against ours, per AMP mode."""
    dev = torch.device(args.device)
    cfg = _config(args.config, args.override)
    rows = [("HF head", True, [])]
    hf_math = ["model.decoder.norm=batchnorm", "model.decoder.dropout=0.0"]
    rows.append(("ours, batchnorm, no dropout", False, hf_math))
    if (cfg.model.decoder.norm, cfg.model.decoder.dropout) != ("batchnorm", 0.0):
        rows.append((f"ours, as configured ({cfg.model.decoder.norm}, dropout {cfg.model.decoder.dropout})", False, []))
    print(f"| model | amp | images/s | vs HF head | peak memory (GiB) |\n|---|---|---|---|---|")
    for amp in args.amp.split(","):
        hf = None
        for label, hf_head, extra in rows:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            speed = run(args.config, args.iterations, amp, args.reference, list(args.override or []) + extra,
                        args.device, hf_head)
            hf = hf or speed
            peak = f"{torch.cuda.max_memory_allocated(dev) / 2**30:.2f}" if dev.type == "cuda" else "-"
            print(f"| {label} | {amp} | {speed:.1f} | {speed / hf:.2f}x | {peak} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", nargs="?", default="configs/demo.yaml")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--amp", default="none,bf16")
    parser.add_argument("--reference", action="store_true", help="the model as built, without fast paths")
    parser.add_argument("--override", "-o", action="append", metavar="KEY=VALUE",
                        help="a config key, as upernet-vit train -o (e.g. model.backbone_size=base)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--hf-head", action="store_true", help="against the model with transformers' UperNetHead")
    args = parser.parse_args()
    extra = f" | {' '.join('-o ' + o for o in args.override)}" if args.override else ""
    print(f"# {args.config}{extra} | torch {torch.__version__} | {device_name(torch.device(args.device))} | "
          f"{torch.get_num_threads()} threads | {os.cpu_count()} cpus")
    if args.hf_head:
        return hf_table(args)
    print("| amp | images/s | vs fp32 |\n|---|---|---|")
    fp32 = None
    for amp in args.amp.split(","):
        speed = run(args.config, args.iterations, amp, args.reference, args.override, args.device)
        fp32 = fp32 or speed
        print(f"| {amp} | {speed:.1f} | {speed / fp32:.2f}x |")


if __name__ == "__main__":
    main()
