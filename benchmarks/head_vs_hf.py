"""Our UperNetHead against transformers' UperNetHead: same weights, same inputs, same process.

    python benchmarks/head_vs_hf.py [--repeats 5] [--threads N]

For each setting prints eval-forward and train forward+backward times (median of --repeats), the ratio
ours/HF, the max |diff| of the outputs, and achieved GFLOP/s as a fraction of a measured fp32 GEMM
(the roofline). Modes: ``eval``, ``eval fused`` (our head after BatchNorm folding, ``UperNetViT.fuse()``;
HF unchanged) and ``train`` (forward + backward).
"""
from __future__ import annotations

import argparse
import copy
import platform
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import UperNetConfig
from transformers.models.upernet.modeling_upernet import UperNetHead as HFUperNetHead

from upernet_vit import UperNetHead, from_hf_upernet
from upernet_vit.layers import fuse_conv_bn

from timing import timed_pair  # benchmarks/timing.py

SETTINGS = [  # (name, in_channels, channels, map sizes (stride 4..32), batch)
    ("ViT-S-like 256px", [384] * 4, 256, [64, 32, 16, 8], 2),
    ("ViT-B-like 512px", [768] * 4, 512, [128, 64, 32, 16], 2),
]


def gemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times) / 1e9


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    roof = gemm_gflops()
    print(f"# torch {torch.__version__} | {platform.machine()} | {torch.get_num_threads()} threads | "
          f"fp32 GEMM {roof:.0f} GFLOP/s (roofline)")
    print("| setting | mode | HF (s) | ours (s) | ours/HF | max abs diff | GFLOP (direct) | HF % roofline "
          "| ours effective % roofline |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, in_channels, channels, sizes, batch in SETTINGS:
        torch.manual_seed(0)
        hf = HFUperNetHead(UperNetConfig(hidden_size=channels, pool_scales=[1, 2, 3, 6], num_labels=4), in_channels)
        ours = UperNetHead(in_channels, channels=channels, num_classes=4, norm="batchnorm", dropout=0.0)
        ours.load_state_dict(from_hf_upernet(hf.state_dict()))
        feats = [torch.randn(batch, c, s, s) for c, s in zip(in_channels, sizes)]
        fused = copy.deepcopy(ours).eval()
        fuse_conv_bn(fused)
        for mode in ("eval", "eval fused", "train"):
            hf.train(mode == "train")
            ours.train(mode == "train")
            mine = fused if mode == "eval fused" else ours

            def run(head):
                if mode.startswith("eval"):
                    with torch.no_grad():
                        return head(feats)
                out = head(feats)
                out.sum().backward()
                return out

            with torch.no_grad():
                diff = (hf.eval()(feats) - mine.eval()(feats)).abs().max().item()
            hf.train(mode == "train")
            mine.train(mode == "train")
            t_hf, t_ours = timed_pair(lambda: run(hf), lambda: run(mine), args.repeats)
            # FLOPs of the direct convolutions (HF's count); Winograd does fewer multiplies for the same
            # result, so ours is an *effective* rate that can exceed the GEMM roofline
            gflop = flops(lambda: run(hf)) / 1e9
            print(f"| {name} | {mode} | {t_hf:.3f} | {t_ours:.3f} | {t_ours / t_hf:.2f} | {diff:.1e} | "
                  f"{gflop:.0f} | {100 * gflop / t_hf / roof:.0f}% | {100 * gflop / t_ours / roof:.0f}% |")


if __name__ == "__main__":
    main()
