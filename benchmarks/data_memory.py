"""Peak memory of a short training run against dataset size, and the loader's speed from the data cache.

    python benchmarks/data_memory.py [--sizes 100 1000 3000] [--image 1024] [--work /tmp/data_memory]
                                     [--compare-checkout DIR]

Writes synthetic RGB PNGs of ``--image`` px (textured shapes, 8-bit) with their masks into a folders
dataset under ``--work`` once (the smaller sizes are symlinked subsets of the largest), then for each size
runs ``upernet-vit train`` (a tiny ViT, 256 px patches, batch 4, 2 DataLoader workers, 20 iterations, 2
validation images) in a fresh process and samples the summed proportional set size (PSS: shared pages
counted once across the main process and its workers) of the process tree every 50 ms. The data cache is
built by the first run of each size (its time is reported apart); the memory is that of a second run,
which reads the cache. ``--compare-checkout DIR`` runs the same commands with an older checkout first on
``PYTHONPATH`` (e.g. a ``git worktree`` of a commit before the cache), for the in-memory reference; it is
skipped above 300 images, where it would need ~12 MB of float32 per 1024 px RGB image in each process.

Last, the loader's patches per second from the cache (one process, the training augmentation) against the
tiny model's training step on the same machine. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

import numpy as np
import yaml
from PIL import Image


def write_dataset(folder: str, count: int, size: int) -> None:
    """``count`` RGB images of ``size`` px with 3-class masks (a disk and a square on a texture)."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    os.makedirs(os.path.join(folder, "masks"), exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(count):
        path = os.path.join(folder, "images", f"case_{i:05d}.png")
        if os.path.exists(path):
            continue
        rng = np.random.default_rng(i)
        cy, cx, r = rng.integers(size // 4, 3 * size // 4, 2).tolist() + [int(rng.integers(size // 10, size // 5))]
        mask = np.zeros((size, size), np.uint8)
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 1
        top, left = rng.integers(0, size - size // 6, 2)
        mask[top: top + size // 6, left: left + size // 6] = 2
        base = (np.sin(xx / (7 + i % 5)) * 40 + np.cos(yy / 9) * 40 + 110).astype(np.float32)
        image = np.stack([base + 60 * (mask == c) for c in (1, 2, 0)], -1) + rng.normal(0, 8, (size, size, 3))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)
        Image.fromarray(mask).save(os.path.join(folder, "masks", f"case_{i:05d}.png"))


def subset(full: str, folder: str, count: int) -> None:
    """A dataset of the first ``count`` cases of ``full``, as symlinks."""
    for sub in ("images", "masks"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        for name in sorted(os.listdir(os.path.join(full, sub)))[:count]:
            link = os.path.join(folder, sub, name)
            if not os.path.lexists(link):
                os.symlink(os.path.join(full, sub, name), link)


def tree_pss_mb(pid: int) -> float:
    """Summed PSS of ``pid`` and its descendants, in MiB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            pass
    return total / 1024


def run_training(config: str, output: str, env: Dict[str, str]) -> Dict[str, float]:
    """``upernet-vit train`` in a fresh process: peak tree PSS (MiB) and seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "upernet_vit", "train", config, "--output", output],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_pss_mb(proc.pid))
            time.sleep(0.05)

    thread = threading.Thread(target=sample)
    thread.start()
    _, err = proc.communicate()
    thread.join()
    if proc.returncode:
        raise RuntimeError(f"training failed: {err[-2000:]}")
    return {"peak_mb": peak[0], "seconds": time.perf_counter() - start}


def write_config(work: str, root: str, image: int, cache_dir: Optional[str]) -> str:
    names = sorted(n[:-4] for n in os.listdir(os.path.join(root, "images")))
    splits = os.path.join(work, f"splits_{os.path.basename(root)}.json")
    with open(splits, "w") as f:
        json.dump([{"train": names[2:], "val": names[:2]}], f)
    config = {
        "model": {"backbone": "vit_small_patch16_224", "backbone_size": None,
                  "backbone_kwargs": {"depth": 4, "embed_dim": 64, "num_heads": 2}, "decoder": {"hidden_size": 32}},
        "train": {"num_epochs": 1, "num_iterations_per_epoch": 20, "num_val_iterations_per_epoch": 2,
                  "warmup_epochs": 0, "num_overlays": 0, "check_memory": False},
        "data": {"format": "folders", "root": root, "splits_file": splits, "patch_size": [256, 256],
                 "batch_size": 4, "num_workers": 2, **({"cache_dir": cache_dir} if cache_dir else {})},
    }
    path = os.path.join(work, f"config_{os.path.basename(root)}_{image}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


def loader_speed(root: str, cache_dir: str) -> Dict[str, float]:
    """Patches per second of the training PatchDataset from the cache (one process) and of the tiny
    model's training step (forward, backward, AdamW) on batches of 4 such patches."""
    import torch

    from upernet_vit import UperNetViT
    from upernet_vit.config import load_config
    from upernet_vit.data.augment import PatchDataset
    from upernet_vit.data.cache import cached_dataset
    from upernet_vit.data.normalization import Normalizer

    cfg = load_config({"data": {"format": "folders", "root": root}}).data
    _, cases = cached_dataset(cfg, cache_dir)
    dataset = PatchDataset(cases, [256, 256], Normalizer([0.5] * 3, [0.25] * 3, "preset", 255.0), 64, 0,
                           cfg.augmentation)
    start = time.perf_counter()
    batch = [dataset[i] for i in range(64)]
    loader = 64 / (time.perf_counter() - start)
    model = UperNetViT("vit_small_patch16_224", None, 3, hidden_size=32,
                       backbone_kwargs={"depth": 4, "embed_dim": 64, "num_heads": 2})
    optimizer = torch.optim.AdamW(model.parameters())
    images = torch.stack([b[0] for b in batch[:4]])
    labels = torch.stack([b[1] for b in batch[:4]])
    start = time.perf_counter()
    for _ in range(5):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels, ignore_index=-100).backward()
        optimizer.step()
    step = 5 * 4 / (time.perf_counter() - start)
    return {"loader_patches_s": loader, "train_patches_s": step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 3000])
    parser.add_argument("--image", type=int, default=1024)
    parser.add_argument("--work", default="/tmp/data_memory")
    parser.add_argument("--compare-checkout", default=None)
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    full = os.path.join(args.work, f"full_{args.image}")
    start = time.perf_counter()
    write_dataset(full, max(args.sizes), args.image)
    print(f"dataset: {max(args.sizes)} images of {args.image} px written in {time.perf_counter() - start:.0f} s "
          f"({sum(os.path.getsize(os.path.join(full, 'images', n)) for n in os.listdir(os.path.join(full, 'images'))) / 2**20:.0f} MiB of PNG)",
          flush=True)
    cpu = next((l.split(":")[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
    rows: List[str] = []
    cache_dir = os.path.join(args.work, "cache")
    for count in args.sizes:
        root = os.path.join(args.work, f"ds_{count}_{args.image}")
        subset(full, root, count)
        config = write_config(args.work, root, args.image, cache_dir)
        env = dict(os.environ)
        first = run_training(config, os.path.join(args.work, f"run_{count}_first"), env)
        second = run_training(config, os.path.join(args.work, f"run_{count}_second"), env)
        row = (f"| {count} | {args.image} | cache | {second['peak_mb']:.0f} | {first['seconds']:.0f} "
               f"(builds the cache) / {second['seconds']:.0f} |")
        if args.compare_checkout and count <= 300:
            old_env = {**env, "PYTHONPATH": os.path.abspath(args.compare_checkout)}
            old_config = write_config(args.work, root, args.image, None)
            with open(old_config) as f:
                data = yaml.safe_load(f)
            data["data"].pop("cache_dir", None)
            with open(old_config, "w") as f:
                yaml.safe_dump(data, f)
            old = run_training(old_config, os.path.join(args.work, f"run_{count}_old"), old_env)
            row += f" in memory ({args.compare_checkout}): {old['peak_mb']:.0f} MiB, {old['seconds']:.0f} s |"
        rows.append(row)
        print(row, flush=True)
    speed = loader_speed(os.path.join(args.work, f"ds_{args.sizes[0]}_{args.image}"), cache_dir)
    print(f"\n{cpu}, {time.strftime('%Y-%m-%d')}, torch {__import__('torch').__version__}\n")
    print("| images | px | data | peak PSS of the run (MiB) | seconds (first / second run) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nloader from the cache: {speed['loader_patches_s']:.1f} patches/s per process (256 px, training "
          f"augmentation); the tiny model's training step: {speed['train_patches_s']:.1f} patches/s")


if __name__ == "__main__":
    main()
