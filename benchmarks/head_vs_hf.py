"""Our UperNetHead, as built (the reference) and after ``upernet_vit.fast.optimize``, against transformers'
UperNetHead: same weights, same inputs, same process.

    python benchmarks/head_vs_hf.py [--repeats 5] [--threads N] [--ablation] [--settings S B]
                                    [--device cpu|cuda] [--dtype fp32|bf16]

For each setting and mode, prints the median time of each head (run in turn), its ratio to HF's, and the
max |diff| of each output against HF's. Modes: ``eval``, ``eval, fuse_bn`` (ours with BatchNorm folded:
``optimize(..., fuse_bn=True)``; HF unchanged) and ``train`` (forward + backward). Columns:
- ``reference``: ``UperNetHead`` as built (resize, concat, conv)
- ``train default``: what ``optimize(model)`` does to a model in training mode on the CPU (``upernet-vit
  train``): recompute_upsampled, no channels_last
- ``eval default``: what ``optimize(model)`` does in eval mode on the CPU (``upernet-vit predict``):
  recompute_upsampled and channels_last
- ``+ winograd``: the eval default with Winograd F(2x2,3x3) 3x3 convs (CPU fp32; ``--winograd``)
Each head is optimized once and timed in every mode, so the flags are given explicitly here.

``--settings T`` (not among the defaults) is a tiny head at 64 px, a check that the script runs (not a figure).

``--ablation`` times each flag alone instead: ``channels_last``, ``recompute_upsampled``, ``winograd``.

``--device cuda`` runs both heads and their inputs on the GPU (``timed`` waits for its work before each
reading). ``--dtype bf16`` runs every head under ``torch.autocast(dtype=torch.bfloat16)`` with float32
weights, as ``train.amp: bf16`` trains, and compares the outputs with HF's under the same autocast. Winograd
is a CPU fp32 path, so its columns are left out on another device or dtype.
"""
from __future__ import annotations

import argparse
import contextlib
import copy

import torch
from transformers import UperNetConfig
from transformers.models.upernet.modeling_upernet import UperNetHead as HFUperNetHead

from upernet_vit import UperNetHead, from_hf_upernet
from upernet_vit.fast import optimize

from timing import device_name, timed  # benchmarks/timing.py

SETTINGS = [  # (name, in_channels, channels, map sizes (stride 4..32), batch)
    ("ViT-S-like 256px", [384] * 4, 256, [64, 32, 16, 8], 2),
    ("ViT-B-like 512px", [768] * 4, 512, [128, 64, 32, 16], 2),
]
SMOKE_SETTINGS = [  # --settings T only: a tiny head, to check that the script runs (benchmarks/gpu.sh's CPU fallback)
    ("ViT-T-like 64px [smoke run]", [192] * 4, 128, [16, 8, 4, 2], 2),
]
VARIANTS = {  # column -> optimize() flags (None: the head as built)
    "reference": None,
    "train default": {"channels_last": False},  # optimize() in training mode on the CPU
    "eval default": {"channels_last": True},  # optimize() in eval mode on the CPU
    "+ winograd": {"channels_last": True, "winograd": True},
}
ABLATION = {
    "reference": None,
    "channels_last": {"channels_last": True, "recompute_upsampled": False},
    "recompute_upsampled": {"channels_last": False, "recompute_upsampled": True},
    "winograd": {"channels_last": False, "recompute_upsampled": False, "winograd": True},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--ablation", action="store_true", help="each optimize() flag alone")
    parser.add_argument("--settings", nargs="+", choices=[s[0].split("-")[1] for s in SETTINGS + SMOKE_SETTINGS],
                        default=[s[0].split("-")[1] for s in SETTINGS], help="which settings (S, B)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: every head under bf16 autocast (float32 weights), as train.amp=bf16")
    args = parser.parse_args()
    variants = ABLATION if args.ablation else VARIANTS
    device = torch.device(args.device)
    if device.type != "cpu" or args.dtype != "fp32":  # Winograd is a CPU fp32 path
        variants = {k: v for k, v in variants.items() if not (v or {}).get("winograd")}
    if args.threads:
        torch.set_num_threads(args.threads)

    def autocast():
        if args.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    print(f"# {device_name(device)} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
          + ("fp32" if args.dtype == "fp32" else "bf16 autocast, fp32 weights"))
    print("| setting | mode | HF (s) | " + " | ".join(f"{v} (s) | {v}/HF" for v in variants) + " | max abs diff |")
    print("|---|---|---|" + "---|---|" * len(variants) + "---|")
    for name, in_channels, channels, sizes, batch in SETTINGS + SMOKE_SETTINGS:
        if name.split("-")[1] not in args.settings:
            continue
        torch.manual_seed(0)
        hf = HFUperNetHead(UperNetConfig(hidden_size=channels, pool_scales=[1, 2, 3, 6], num_labels=4), in_channels)
        reference = UperNetHead(in_channels, channels=channels, num_classes=4, norm="batchnorm", dropout=0.0)
        reference.load_state_dict(from_hf_upernet(hf.state_dict()))
        hf, reference = hf.to(device), reference.to(device)
        ours = [reference if flags is None else optimize(copy.deepcopy(reference), **flags) for flags in variants.values()]
        feats = [torch.randn(batch, c, s, s).to(device) for c, s in zip(in_channels, sizes)]
        for mode in ("eval", "eval, fuse_bn", "train"):
            training = mode == "train"
            heads = [hf.train(training)] + [h.train(training) for h in ours]
            if mode == "eval, fuse_bn":  # each variant's flags plus fuse_bn (the reference: fuse_bn alone)
                heads = [hf] + [
                    optimize(copy.deepcopy(reference).eval(), fuse_bn=True,
                             **(flags if flags is not None else {"channels_last": False, "recompute_upsampled": False}))
                    for flags in variants.values()
                ]

            def run(head):
                if not training:
                    with torch.no_grad(), autocast():
                        return head(feats)
                with autocast():
                    out = head(feats)
                out.float().sum().backward()
                return out

            with torch.no_grad(), autocast():
                outs = [h.eval()(feats).float() for h in heads]
                diff = max((o - outs[0]).abs().max().item() for o in outs[1:])
            for h in heads:
                h.train(training)
            times = timed([lambda h=h: run(h) for h in heads], args.repeats)
            cells = " | ".join(f"{t:.3f} | {t / times[0]:.2f}" for t in times[1:])
            print(f"| {name} | {mode} | {times[0]:.3f} | {cells} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
