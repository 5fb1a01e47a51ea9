"""Draw README's picture of demo predictions: image, ground truth and prediction for a few test cases.

    upernet-vit train demo --output runs/demo
    upernet-vit make-demo /tmp/demo_data
    upernet-vit predict --model runs/demo --input /tmp/demo_data/imagesTs --output /tmp/demo_pred
    python tools/demo_figure.py /tmp/demo_data /tmp/demo_pred docs/images/demo_predictions.png

Reads the nnU-Net raw dataset ``make-demo`` wrote (``imagesTs``, ``labelsTs``) and the prediction folder;
writes a small PNG (a new file, or one this script wrote before).
"""
from __future__ import annotations

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

COLOURS = np.array([[0, 0, 0], [230, 159, 0], [86, 180, 233], [0, 158, 115], [240, 228, 66], [204, 121, 167]],
                   dtype=np.uint8)  # background, then the Okabe-Ito colours: readable with colour blindness


def main(argv: list) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", help="the make-demo dataset (imagesTs, labelsTs, dataset.json)")
    parser.add_argument("predictions", help="the predict output folder")
    parser.add_argument("output", help="the PNG to write")
    parser.add_argument("--cases", type=int, default=4)
    args = parser.parse_args(argv)
    if os.path.exists(args.output) and not _ours(args.output):
        parser.error(f"{args.output} exists and is not a figure this script wrote; choose another path")
    cases = sorted(n[: -len("_0000.png")] for n in os.listdir(os.path.join(args.dataset, "imagesTs"))
                   if n.endswith("_0000.png"))[: args.cases]
    fig, axes = plt.subplots(3, len(cases), figsize=(1.6 * len(cases), 5.0), squeeze=False)
    for col, case in enumerate(cases):
        image = np.asarray(Image.open(os.path.join(args.dataset, "imagesTs", f"{case}_0000.png")).convert("RGB"))
        truth = np.asarray(Image.open(os.path.join(args.dataset, "labelsTs", f"{case}.png")))
        pred = np.asarray(Image.open(os.path.join(args.predictions, f"{case}.png")))
        for row, (title, picture) in enumerate((("image", image), ("ground truth", COLOURS[truth % len(COLOURS)]),
                                                ("prediction", COLOURS[pred % len(COLOURS)]))):
            axes[row][col].imshow(picture, interpolation="nearest")
            axes[row][col].set_xticks([]), axes[row][col].set_yticks([])
            if col == 0:
                axes[row][col].set_ylabel(title)
    fig.tight_layout()
    fig.savefig(args.output, dpi=72, metadata={"Software": "upernet-vit tools/demo_figure.py"})
    print(f"wrote {args.output} ({os.path.getsize(args.output) // 1024} KiB)")
    return 0


def _ours(path: str) -> bool:
    try:
        with Image.open(path) as img:
            return img.info.get("Software") == "upernet-vit tools/demo_figure.py"
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
