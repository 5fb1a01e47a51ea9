"""Peak training memory of a whole UperNetViT step, with and without backbone gradient checkpointing.

    python benchmarks/model_memory.py [--backbone dinov2 --size base --image 512 --batch 2]

Each variant runs in its own process; the figure is the process's peak resident memory during one
forward+backward minus its resident memory after building the model (CPU; on CUDA use
torch.cuda.max_memory_allocated instead). Random weights; nothing downloaded.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one_step(args: argparse.Namespace) -> None:
    import torch

    from upernet_vit import UperNetViT

    model = UperNetViT(args.backbone, args.size, 4, gradient_checkpointing=args.checkpointing).train()
    x = torch.randn(args.batch, 3, args.image, args.image)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    model(x).square().mean().backward()
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"step_mb": (peak - before) / 1024, "seconds": elapsed}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="dinov2")
    parser.add_argument("--size", default="base")
    parser.add_argument("--image", type=int, default=518)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        one_step(args)
        return
    print(f"# {args.backbone} {args.size}, {args.image} px, batch {args.batch}, one training step (CPU)")
    print("| gradient checkpointing | step memory (MB) | step time (s) |\n|---|---|---|")
    rows = {}
    for flag in (False, True):
        cmd = [sys.executable, __file__, "--child", "--backbone", args.backbone, "--size", args.size,
               "--image", str(args.image), "--batch", str(args.batch)] + (["--checkpointing"] if flag else [])
        rows[flag] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        print(f"| {'on' if flag else 'off'} | {rows[flag]['step_mb']:.0f} | {rows[flag]['seconds']:.1f} |")
    print(f"\ncheckpointing: memory x{rows[True]['step_mb'] / rows[False]['step_mb']:.2f}, "
          f"time x{rows[True]['seconds'] / rows[False]['seconds']:.2f}")


if __name__ == "__main__":
    main()
