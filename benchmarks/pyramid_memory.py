"""The feature pyramid alone at large ViT widths: ``SimpleFeaturePyramid`` (D channels at every level,
the default) against ``ViTDetFeaturePyramid`` (narrower upsampling, then a projection to C = 512).

    python benchmarks/pyramid_memory.py [--tokens 32 --batch 1]

Per width (ViT-L 1024, ViT-g 1536, DINOv3-7B 4096) and pyramid: parameters, the training state they
need with AdamW (float32 weight, gradient and two moments: 16 bytes a parameter), and one
forward+backward's peak resident memory beyond the weights (as ``model_memory.py`` measures it, in a child
process each) for four random ``[batch, D, tokens, tokens]`` maps (32 x 32 tokens: 512 px at patch 16).
"""
from __future__ import annotations

import argparse
import json
import sys

from model_memory import measure, run_child  # benchmarks/model_memory.py

WIDTHS = {"ViT-L (1024)": 1024, "ViT-g (1536)": 1536, "DINOv3-7B (4096)": 4096}


def one_step(args: argparse.Namespace) -> None:
    import torch

    from upernet_vit.vit_adapter import build_feature_pyramid

    torch.manual_seed(0)
    pyramid = build_feature_pyramid(args.pyramid, args.width, 512, "layernorm").train()
    maps = [torch.randn(args.batch, args.width, args.tokens, args.tokens) for _ in range(4)]
    row = measure(lambda: sum(level.square().mean() for level in pyramid(maps)).backward())
    print(json.dumps({"params": sum(p.numel() for p in pyramid.parameters()), **row}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--width", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pyramid", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pyramid:  # a child process: one measurement
        return one_step(args)
    print(f"# pyramid alone, 4 maps of {args.tokens} x {args.tokens} tokens, batch {args.batch}, one training step (CPU)")
    print("| width | pyramid | parameters | AdamW training state (GB) | step memory (MB) | step time (s) |")
    print("|---|---|---|---|---|---|")
    for label, width in WIDTHS.items():
        for pyramid in ("simple", "vitdet"):
            cmd = [sys.executable, __file__, "--width", str(width), "--pyramid", pyramid,
                   "--tokens", str(args.tokens), "--batch", str(args.batch)]
            row = run_child(cmd)
            print(f"| {label} | {pyramid} | {row['params'] / 1e6:.0f} M | {row['params'] * 16 / 2**30:.2f} "
                  f"| {row['step_mb']:.0f} | {row['seconds']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
