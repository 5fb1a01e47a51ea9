"""Training throughput (images/s) of a config on this machine: forward+backward+step on its patches.

    python benchmarks/train_throughput.py configs/demo.yaml [--iterations 30] [--amp none,bf16] [--reference]

The model gets the fast paths ``upernet-vit train`` applies (``optimize(model)`` in training mode on this
device); ``--reference`` times
the model as built.

Prints one table row per AMP mode, with the fp32 row as the reference for the speed-up column.
Data loading is excluded (batches are prepared first); the first 5 iterations are warm-up.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

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


def run(config_path: str, iterations: int, amp: str, reference: bool = False) -> float:
    cfg = load_config(config_path)
    torch.manual_seed(0)
    model = UperNetViT.from_config(cfg, num_classes=4, in_chans=1)
    if not reference:
        optimize(model.train())
    data = cfg.data
    cases = demo_cases(16, data.demo_image_size)
    ds = PatchDataset(cases, data.patch_size, Normalizer(model.mean, model.std), iterations * data.batch_size, 0, AugmentationConfig())
    batches = [
        (torch.stack([ds[i * data.batch_size + j][0] for j in range(data.batch_size)]),
         torch.stack([ds[i * data.batch_size + j][1] for j in range(data.batch_size)]))
        for i in range(iterations)
    ]
    optimizer = build_optimizer(model, cfg.train, model.backbone.depth)
    criterion = DiceCELoss()
    dtype = {"bf16": torch.bfloat16}.get(amp)
    model.train()
    warmup = 5
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
    elapsed = time.perf_counter() - start
    return (iterations - warmup) * data.batch_size / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", nargs="?", default="configs/demo.yaml")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--amp", default="none,bf16")
    parser.add_argument("--reference", action="store_true", help="the model as built, without fast paths")
    args = parser.parse_args()
    print(f"# {args.config} | torch {torch.__version__} | {device_name(torch.device('cpu'))} | "
          f"{torch.get_num_threads()} threads | {os.cpu_count()} cpus")
    print("| amp | images/s | vs fp32 |\n|---|---|---|")
    fp32 = None
    for amp in args.amp.split(","):
        speed = run(args.config, args.iterations, amp, args.reference)
        fp32 = fp32 or speed
        print(f"| {amp} | {speed:.1f} | {speed / fp32:.2f}x |")


if __name__ == "__main__":
    main()
