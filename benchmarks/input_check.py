"""Cost of the input checks in ``UperNetViT.forward`` (``check_input``: dtype, shape, and the
``check_finite`` pass that refuses NaN/infinite values) and of the weights' sha256 in
``save_pretrained``/``from_pretrained``.

    python benchmarks/input_check.py [--backbone vit_base_patch16_224 --sizes 224 512 --batch 2 --repeats 5]

Prints, per input size, the eval forward time with ``model.check_finite`` on and off, their ratio, and
the check alone (``torch.isfinite(x).all()``); then the sha256 time per saved model. Random weights.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from timing import device_name, timed
from upernet_vit import UperNetViT
from upernet_vit.pretrained import WEIGHTS_NAME, file_sha256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="vit_base_patch16_224")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = UperNetViT(args.backbone, None, 4, hidden_size=512).to(device).eval()
    print(f"{args.backbone}, batch {args.batch}, {device} ({device_name(device)}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'input':>10s}  {'checked (s)':>11s}  {'unchecked (s)':>13s}  {'ratio':>6s}  {'check alone (ms)':>16s}")
    for size in args.sizes:
        x = torch.rand(args.batch, 3, size, size, device=device)

        def forward(check: bool) -> None:
            model.check_finite = check
            with torch.no_grad():
                model(x)

        on, off, alone = timed([lambda: forward(True), lambda: forward(False),
                                lambda: bool(torch.isfinite(x).all())], args.repeats)
        print(f"{size:>6d} px  {on:11.3f}  {off:13.3f}  {on / off:6.3f}  {alone * 1e3:16.3f}")
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        model.save_pretrained(folder)
        save = time.perf_counter() - start
        weights = os.path.join(folder, WEIGHTS_NAME)
        start = time.perf_counter()
        file_sha256(weights)
        digest = time.perf_counter() - start
        print(f"save_pretrained {save:.2f} s, of which sha256 of {os.path.getsize(weights) / 2**20:.0f} MB "
              f"{digest:.2f} s (from_pretrained verifies it: the same {digest:.2f} s)")


if __name__ == "__main__":
    main()
