"""bf16 autocast against fp32: predictions on the demo data, and speed.

    python benchmarks/precision.py [--run RUNS/demo] [--device cpu|cuda] [--train-bf16]

1. Predictions: the demo model (``configs/demo.yaml``, trained in fp32 into a temporary folder unless
   ``--run`` names a finished run) predicts the validation fold with sliding windows in fp32 and under
   bf16 autocast. Prints per-class Dice for both, the difference in points, and the share of pixels
   whose predicted class changed.
2. ``--train-bf16`` also trains the demo with ``train.amp=bf16`` and reports its Dice (fp32 inference),
   i.e. whether bf16 *training* reaches the same accuracy. A few minutes more.
3. Speed: eval forward and train step (forward + backward) times of a ViT-B/16 + UperNet (512 px,
   batch 2) and of the demo model (96 px, batch 8), fp32 against bf16 autocast; ratio bf16/fp32.
   bf16 pays off only where the hardware has bf16 matrix units (CPU AMX, NVIDIA tensor cores).
"""
from __future__ import annotations

import argparse
import os
import tempfile
from contextlib import nullcontext
from typing import Dict, Optional

import torch

from upernet_vit import UperNetViT
from upernet_vit.config import load_config
from upernet_vit.data.normalization import Normalizer
from upernet_vit.inference.sliding_window import sliding_window_logits
from upernet_vit.inference.metrics import confusion_counts, summarize
from upernet_vit.data.prepare import prepare_data
from upernet_vit.training.trainer import Trainer

from timing import device_name, timed  # benchmarks/timing.py

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "demo.yaml")


def train_demo(folder: str, amp: str) -> str:
    cfg = load_config(DEMO)
    cfg.train.amp = amp
    Trainer(cfg, folder).run()
    return folder


def evaluate_run(run: str, device: torch.device, amp_dtype: Optional[torch.dtype]) -> Dict:
    """Dice on the run's validation fold (its own config) and the predicted label maps."""
    cfg = load_config(os.path.join(run, "config.yaml"))
    data = prepare_data(cfg.data)
    model = UperNetViT.from_pretrained(os.path.join(run, "checkpoint_best"), device=device).eval()
    normalizer = Normalizer(model.mean, model.std, cfg.data.normalization)
    counts = torch.zeros(data.info.num_classes, 3, dtype=torch.int64)
    preds = []
    for case in data.val_cases:
        image = normalizer(torch.from_numpy(case.image)).to(device)
        pred = sliding_window_logits(model, image, cfg.data.patch_size, amp_dtype=amp_dtype).argmax(0).cpu()
        counts += confusion_counts(pred, torch.from_numpy(case.label), data.info.num_classes)
        preds.append(pred)
    return {"metrics": summarize(counts, data.info.label_names), "preds": preds, "labels": data.info.label_names}


def speed(name: str, model: UperNetViT, x: torch.Tensor, repeats: int) -> None:
    device_type = x.device.type

    def ctx(bf16: bool):
        return torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def eval_step(bf16: bool):
        model.eval()
        with torch.no_grad(), ctx(bf16):
            model(x)

    def train_step(bf16: bool):
        model.train()
        with ctx(bf16):
            loss = model(x).float().square().mean()
        loss.backward()

    for mode, step in (("eval", eval_step), ("train", train_step)):
        t32, t16 = timed([lambda: step(False), lambda: step(True)], repeats)
        print(f"| {name} | {mode} | {t32:.3f} | {t16:.3f} | {t16 / t32:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", help="a finished demo run folder (default: train one, fp32, ~3 min on 2 cores)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-bf16", action="store_true", help="also train the demo with train.amp=bf16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    cpu = device_name(torch.device("cpu"))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    amx = "amx_bf16" in open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else None
    print(f"# torch {torch.__version__} | {device} {gpu} | {cpu} | CPU AMX-BF16: {amx} | {torch.get_num_threads()} threads")

    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or train_demo(os.path.join(tmp, "fp32"), "none")
        fp32 = evaluate_run(run, device, None)
        bf16 = evaluate_run(run, device, torch.bfloat16)
        runs = {"fp32 inference": fp32, "bf16 inference": bf16}
        if args.train_bf16:
            runs["bf16-trained, fp32 inference"] = evaluate_run(train_demo(os.path.join(tmp, "bf16"), "bf16"), device, None)
    labels = fp32["labels"]
    print("\n| demo validation fold | " + " | ".join(f"Dice {n}" for n in labels) + " | mean fg Dice |")
    print("|---" * (len(labels) + 2) + "|")
    for name, result in runs.items():
        m = result["metrics"]
        print(f"| {name} | " + " | ".join(f"{100 * m[f'dice_{n}']:.2f}" for n in labels) + f" | {100 * m['dice_mean']:.2f} |")
    changed = sum(int((a != b).sum()) for a, b in zip(fp32["preds"], bf16["preds"]))
    total = sum(p.numel() for p in fp32["preds"])
    gap = 100 * (bf16["metrics"]["dice_mean"] - fp32["metrics"]["dice_mean"])
    print(f"\nbf16 - fp32 inference: mean fg Dice {gap:+.2f} points; {changed} of {total} pixels "
          f"({100 * changed / total:.3f}%) change class")

    print("\n| model | mode | fp32 (s) | bf16 autocast (s) | bf16/fp32 |\n|---|---|---|---|---|")
    torch.manual_seed(0)
    vit_b = UperNetViT("vit_base_patch16_224", None, 4, norm="batchnorm").to(device)
    speed("ViT-B/16 + UperNet, 512 px, batch 2", vit_b, torch.randn(2, 3, 512, 512, device=device), args.repeats)
    demo_cfg = load_config(DEMO)
    demo = UperNetViT.from_config(demo_cfg, num_classes=len(labels)).to(device)
    speed("demo model, 96 px, batch 8", demo, torch.randn(8, 3, 96, 96, device=device), args.repeats)


if __name__ == "__main__":
    main()
