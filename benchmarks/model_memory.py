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

    python benchmarks/model_memory.py --large [--rows vit_l,vit_g,dinov3_7b] [--weights-dir DIR] [--device cuda]
                                      [--keep-going]

The large backbones (issue 18): ViT-L/16 (DINOv3) at 1024 px, batch 2; DINOv2 ViT-g/14 at 518 px, batch 2;
DINOv3-7B at 512 px, batch 1. Each is built from a weights file as a user's run builds it
(``checkpoint_path``: a timm-layout safetensors file of random bfloat16 values, written once into
``--weights-dir``), then trains two steps (forward, backward, AdamW step) in these set-ups:
- ``LoRA + ckpt + bf16``: ``backbone_dtype: bfloat16`` (built on the meta device and filled from the file),
  LoRA r=8 on qkv, gradient checkpointing, bf16 autocast; the decoder and LoRA weights train in float32;
- ``LoRA + ckpt + bf16, vitdet pyramid``: the same with ``pyramid: vitdet`` (the 7B recipe's);
- ``fp32 default``: full fine-tuning in float32, no checkpointing; run only where the memory estimate
  (``training/memory.py``) is at most ``NEAR_LIMIT`` of the machine's available memory, the share above
  which ``upernet-vit train`` warns that a run may not fit (ViT-L at 1024 px, batch 2, estimated at
  22.0 GiB with 22.3 available, was killed by the kernel); otherwise the row gives the estimate.
Figures per row, in a child process each: the build's peak (the process's own, anonymous memory, sampled
every 2 ms, beyond what it held before: the file's memory-mapped pages are page cache, which the
kernel drops under pressure, and are left out), the second step's peak (the whole process: weights,
gradients, AdamW's moments, which the first step makes at its end and every later step holds, activations)
and time, and the estimate. ``--device cuda`` reports
``torch.cuda.max_memory_allocated`` for the step instead (and times to the hundredth of a second).
``--rows smoke`` (not among the defaults) is a DINOv3 ViT-S/16 at 64 px, batch 1: the same table in seconds,
to check that it runs (benchmarks/gpu.sh's CPU fallback), not a figure to publish. ``--keep-going``: a
set-up whose child process fails gets a row saying so, and the table goes on.
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


# name -> (label, backbone, size, image px, batch)
LARGE_ROWS = {
    "vit_l": ("ViT-L/16 (DINOv3), 1024 px, batch 2", "dinov3", "large", 1024, 2),
    "vit_g": ("ViT-g/14 (DINOv2), 518 px, batch 2", "dinov2", "giant", 518, 2),
    "dinov3_7b": ("DINOv3-7B/16, 512 px, batch 1", "dinov3", "7b", 512, 1),
}
# rows --rows accepts but does not run by default: a tiny one, to check that the table runs end to end
SMOKE_ROWS = {
    "smoke": ("ViT-S/16 (DINOv3), 64 px, batch 1 [smoke run]", "dinov3", "small", 64, 1),
}
ALL_ROWS = {**LARGE_ROWS, **SMOKE_ROWS}
LARGE_SETUPS = ("LoRA + ckpt + bf16", "LoRA + ckpt + bf16, vitdet pyramid", "fp32 default")


def _status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


class PeakAnonMemory:
    """``with PeakAnonMemory() as peak: ...``: the largest ``RssAnon`` (the process's own memory, not the
    page cache of memory-mapped files) seen inside the block, in MB, sampled every ``interval`` s by a thread
    (torch's kernels release the GIL, so it samples while they run)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak_mb = interval, 0.0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, _status_mb("RssAnon"))

    def __enter__(self) -> "PeakAnonMemory":
        import threading

        self.peak_mb = _status_mb("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, _status_mb("RssAnon"))


def write_random_weights(backbone: str, size: str, path: str) -> None:
    """A timm-layout safetensors file of random bfloat16 values for the preset's backbone (shapes from a
    model built on the meta device): 1-D ``weight``s 1, layer-scale ``gamma``s 0.1, other 1-D tensors 0.
    Written atomically: a killed write (the 7B's 13.4 GB) leaves no truncated file for the next run to load."""
    import timm
    import torch
    from safetensors.torch import save_file

    from upernet_vit.backbones.presets import resolve_preset
    from upernet_vit.fileio import atomic_write

    name, preset = resolve_preset(backbone, size)
    with torch.device("meta"):
        vit = timm.create_model(name, num_classes=0, dynamic_img_size=True, **(preset.timm_kwargs if preset else {}))
    generator = torch.Generator().manual_seed(0)

    def fill(key: str, shape: torch.Size) -> torch.Tensor:
        if len(shape) > 1:
            return torch.randn(shape, generator=generator, dtype=torch.bfloat16) * 0.02
        value = 1.0 if key.endswith("weight") else 0.1 if "gamma" in key else 0.0
        return torch.full(shape, value, dtype=torch.bfloat16)

    tensors = {k: fill(k, v.shape) for k, v in vit.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


def large_step(args: argparse.Namespace) -> None:
    """One row of ``--large``: build from the weights file, then one training step; prints a JSON row."""
    import torch
    import torch.nn.functional as F

    from upernet_vit import UperNetViT
    from upernet_vit.backbones.meta import build_on_meta
    from upernet_vit.training.memory import NEAR_LIMIT, available_memory, estimate_training_memory

    _, backbone, size, image, batch = ALL_ROWS[args.row]
    lean = args.setup != "fp32 default"
    options = dict(backbone_dtype="bfloat16" if lean else "float32", freeze_backbone=lean, gradient_checkpointing=lean,
                   pyramid="vitdet" if args.setup.endswith("vitdet pyramid") else "simple", hidden_size=512)
    device = torch.device(args.device)

    def build(**extra: object) -> UperNetViT:
        model = UperNetViT(backbone, size, 2, **options, **extra)
        if lean:
            model.enable_lora(8, 16.0, 0.0, ["qkv"])
        return model

    with build_on_meta():  # shapes only: the estimate before anything is allocated
        estimate = estimate_training_memory(build(), batch, [image, image], "bf16" if lean else "none").total / 2**30
    available = available_memory(device)
    row = {"estimate_gb": estimate, "available_gb": (available or 0) / 2**30}
    if not lean and available is not None and estimate * 2**30 > NEAR_LIMIT * available:
        print(json.dumps(row))  # the fp32 default does not fit this machine (or too narrowly to risk it)
        return
    before = _status_mb("RssAnon")
    start = time.perf_counter()
    with PeakAnonMemory() as building:
        model = build(checkpoint_path=args.weights)
    row["build_s"] = time.perf_counter() - start
    row["build_gb"] = (building.peak_mb - before) / 1024
    row["backbone_gb"] = sum(p.numel() * p.element_size() for p in model.backbone.parameters()) / 2**30
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(batch, 3, image, image, device=device)
    target = torch.randint(0, 2, (batch, image, image), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=lean):
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the first step makes AdamW's moments; from the second on, every step holds them throughout
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with PeakAnonMemory() as stepping:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    row["step_s"] = time.perf_counter() - start
    row["step_gb"] = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                      else (stepping.peak_mb - before) / 1024)
    print(json.dumps(row))


def large_table(args: argparse.Namespace) -> None:
    import torch

    from timing import device_name
    from upernet_vit.training.memory import NEAR_LIMIT

    os.makedirs(args.weights_dir, exist_ok=True)
    print(f"# large backbones, the second training step; {device_name(torch.device(args.device))}; "
          f"memory in GiB ({'torch.cuda.max_memory_allocated' if args.device == 'cuda' else 'peak RssAnon'})")
    print("| backbone, input | set-up | estimate | build peak (backbone size) | step peak | build time (s) "
          "| step time (s) |\n|---|---|---|---|---|---|---|")
    for name in args.rows.split(","):
        label, backbone, size, _, _ = ALL_ROWS[name]
        weights = os.path.join(args.weights_dir, f"{backbone}_{size}_random_bf16.safetensors")
        if not os.path.isfile(weights):
            subprocess.run([sys.executable, __file__, "--write-weights", weights, "--backbone", backbone,
                            "--size", size], check=True)
        for setup in LARGE_SETUPS:
            cmd = [sys.executable, __file__, "--row", name, "--setup", setup, "--weights", weights, "--device", args.device]
            try:
                row = run_child(cmd)
            except (subprocess.CalledProcessError, ValueError, IndexError) as err:
                if not args.keep_going:
                    raise
                lines = (getattr(err, "stderr", None) or str(err)).strip().splitlines() or ["no output"]
                print(f"| {label} | {setup} | failed: {lines[-1].replace('|', '/')[:200]} | | | | |", flush=True)
                continue
            if "step_gb" not in row:
                print(f"| {label} | {setup} | {row['estimate_gb']:.1f} | not run: over {NEAR_LIMIT:.0%} of the "
                      f"{row['available_gb']:.1f} available | | | |", flush=True)
                continue
            digits = 2 if args.device.startswith("cuda") else 0  # a GPU step takes well under a second
            print(f"| {label} | {setup} | {row['estimate_gb']:.1f} | {row['build_gb']:.1f} ({row['backbone_gb']:.1f}) "
                  f"| {row['step_gb']:.1f} | {row['build_s']:.0f} | {row['step_s']:.{digits}f} |", flush=True)


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
    parser.add_argument("--large", action="store_true", help="the large-backbone table (issue 18)")
    parser.add_argument("--rows", default=",".join(LARGE_ROWS), help="--large: which rows, comma-separated")
    parser.add_argument("--weights-dir", default="/tmp/upernet-vit-benchmark-weights",
                        help="--large: where the random weights files are written once (7B: 13.4 GB)")
    parser.add_argument("--device", default="cpu", help="--large: cpu or cuda")
    parser.add_argument("--keep-going", action="store_true", help="--large: a failed set-up gets a row; go on")
    parser.add_argument("--row", choices=ALL_ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--setup", choices=LARGE_SETUPS, help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--write-weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        one_step(args)
        return
    if args.write_weights:
        return write_random_weights(args.backbone, args.size, args.write_weights)
    if args.row:
        return large_step(args)
    if args.large:
        return large_table(args)
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
