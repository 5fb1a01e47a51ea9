"""Black-box audit of failure behaviour (issue 11): bad inputs, damaged files, full and read-only disks.

    python benchmarks/audit_failures.py [--work /tmp/audit]

Each case runs the ``upernet-vit`` command line (or the Python API) as a user would, in a fresh
process, and prints one row: the exit code, the last line of stderr, and what was left on disk. Run it
with ``PYTHONPATH=<an older checkout>`` to compare versions. The full and read-only disk cases mount a
small tmpfs and need root (they are reported as "not run" otherwise). Tiny random models; no downloads.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import yaml
from PIL import Image

TINY = {
    "model": {"backbone": "vit_small_patch16_224", "backbone_size": None,
              "backbone_kwargs": {"depth": 4, "embed_dim": 32, "num_heads": 2}, "decoder": {"hidden_size": 16}},
    "train": {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1, "warmup_epochs": 0},
    "data": {"format": "demo", "demo_cases": 10, "demo_image_size": 32, "patch_size": [32, 32], "batch_size": 2,
             "num_workers": 0},
}


def run(args, cwd, stdin=None, file_size_limit=None):
    env = dict(os.environ)
    limit = None if file_size_limit is None else (
        lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit)))
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, input=stdin, preexec_fn=limit)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    return result.returncode, (lines[-1] if lines else ""), "Traceback" in result.stderr


def cli(*args):
    return [sys.executable, "-c", "import sys; from upernet_vit.cli import main; sys.exit(main())", *args]


def python(code):
    return [sys.executable, "-c", textwrap.dedent(code)]


def float_tiff(path, nan=False):
    image = np.random.default_rng(0).random((32, 32), dtype=np.float32)
    if nan:
        image[3, 3] = np.nan
    Image.fromarray(image, mode="F").save(path)


def write_config(path, **train):
    cfg = json.loads(json.dumps(TINY))
    cfg["train"].update(train)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f)
    return path


def can_mount(work):
    probe = os.path.join(work, "probe")
    os.makedirs(probe, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", probe], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", probe])
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/audit")
    args = parser.parse_args()
    work = os.path.abspath(args.work)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    rows = []

    def case(name, result, left=""):
        code, last, trace = result
        rows.append((name, code, ("[traceback] " if trace else "") + last[:150], left))
        print(f"| {name} | {code} | {('[traceback] ' if trace else '') + last[:150]} | {left} |", flush=True)

    config = write_config(os.path.join(work, "tiny.yaml"))
    run_dir = os.path.join(work, "run")
    case("train the tiny config (setup)", run(cli("train", config, "--output", run_dir), work))
    model_dir = os.path.join(run_dir, "checkpoint_latest")

    # 1. a NaN pixel given to predict
    images = os.path.join(work, "nan_images")
    os.makedirs(images)
    for i in range(3):
        float_tiff(os.path.join(images, f"a{i}.tif"))
    float_tiff(os.path.join(images, "b_nan.tif"), nan=True)
    out = os.path.join(work, "pred_nan")
    result = run(cli("predict", "--model", model_dir, "--input", images, "--output", out, "--probabilities"), work)
    left = sorted(os.listdir(out)) if os.path.isdir(out) else []
    case("predict: one NaN pixel in one of 4 float TIFFs", result, f"{len(left)} files written")

    # 2. the API
    api = f"""
        import torch
        from upernet_vit import UperNetViT
        m = UperNetViT.from_pretrained({model_dir!r}).eval()
        x = torch.rand(1, 1, 32, 32); x[0, 0, 3, 3] = float('nan')
        y = m(x)
        print('nan logits:', float(torch.isnan(y).float().mean()))
    """
    code, last, trace = run(python(api), work)
    case("API: one NaN pixel", (code, last, trace))
    for dtype in ("double", "to(torch.uint8)"):
        api = f"""
            import torch
            from upernet_vit import UperNetViT
            m = UperNetViT.from_pretrained({model_dir!r}).eval()
            m(torch.rand(1, 1, 32, 32).{dtype}() if '{dtype}' == 'double' else (torch.rand(1, 1, 32, 32) * 255).{dtype})
        """
        case(f"API: {dtype} input", run(python(api), work))

    # 3. a NaN pixel in the training data
    data = os.path.join(work, "nan_data")
    os.makedirs(os.path.join(data, "images"))
    os.makedirs(os.path.join(data, "masks"))
    for i in range(6):
        float_tiff(os.path.join(data, "images", f"c{i}.tif"), nan=i == 5)
        Image.fromarray((np.eye(32) * 1).astype(np.uint8)).save(os.path.join(data, "masks", f"c{i}.png"))
    out = os.path.join(work, "run_nan")
    result = run(cli("train", config, "--output", out, "-o", "data.format=folders", "-o", f"data.root={data}",
                     "-o", "data.fold=all"), work)
    case("train: one NaN pixel in a float TIFF", result,
         "checkpoint_best exists" if os.path.isdir(os.path.join(out, "checkpoint_best")) else "no checkpoint")

    # 4. infinite learning rate, duplicate key
    result = run(cli("train", config, "--output", os.path.join(work, "run_inf"), "-o", "train.initial_lr=.inf"), work)
    case("train: train.initial_lr .inf", result)
    dup = os.path.join(work, "dup.yaml")
    with open(config, encoding="utf-8") as f:
        text = f.read()
    with open(dup, "w", encoding="utf-8") as f:
        f.write(text.replace("train:\n", "train:\n  num_epochs: 5\n", 1))
    case("train: num_epochs given twice in the YAML", run(cli("train", dup, "--output", os.path.join(work, "run_dup")), work))

    # 5. damaged model files: a copy of the model folder, changed, given to predict
    def predict_damaged(name, label, damage):
        folder = os.path.join(work, name)
        shutil.copytree(model_dir, folder)
        damage(folder)
        case(label, run(cli("predict", "--model", folder, "--input", os.path.join(images, "a0.tif"), "--output",
                            os.path.join(work, "pred_" + name)), work))

    def flip_a_bit(folder):
        weights = os.path.join(folder, "model.safetensors")
        data_bytes = bytearray(open(weights, "rb").read())
        data_bytes[-100] ^= 0x01
        open(weights, "wb").write(bytes(data_bytes))

    def truncate(folder):
        weights = os.path.join(folder, "model.safetensors")
        open(weights, "wb").write(open(weights, "rb").read()[:5000])
        if os.path.exists(weights + ".sha256"):
            os.remove(weights + ".sha256")

    def edit_config(folder):
        cfg_path = os.path.join(folder, "config.yaml")
        with open(cfg_path, encoding="utf-8") as f:
            text = f.read().replace("hidden_size: 16", "hidden_size: 24")
        with open(cfg_path, "w", encoding="utf-8") as f:
            f.write(text)

    predict_damaged("flipped", "predict: one flipped bit in model.safetensors", flip_a_bit)
    predict_damaged("truncated", "predict: truncated model.safetensors (no checksum file)", truncate)
    predict_damaged("mismatch", "predict: config.yaml edited (hidden_size)", edit_config)
    for label, content in (("text", b"<html>403 Forbidden</html>"), ("empty", b""), ("truncated", None)):
        path = os.path.join(work, f"{label}.pth")
        if content is None:
            import torch

            torch.save({"w": torch.ones(1000)}, path)
            content = open(path, "rb").read()[:1000]
        open(path, "wb").write(content)
        case(f"train: model.checkpoint_path is a {label} file",
             run(cli("train", config, "--output", os.path.join(work, f"run_{label}"), "-o", f"model.checkpoint_path={path}"), work))

    # 6. resume after an architecture change
    case("train --resume with model.decoder.hidden_size changed",
         run(cli("train", config, "--output", run_dir, "--resume", "-o", "model.decoder.hidden_size=24"), work))

    # 7. paths
    open(os.path.join(work, "a_file"), "w").write("x")
    case("train: --output under a file", run(cli("train", config, "--output", os.path.join(work, "a_file", "run")), work))
    case("export: --output in a missing folder",
         run(cli("export", run_dir, "--output", os.path.join(work, "missing", "m.onnx"), "--no-check"), work),
         "file written" if os.path.isfile(os.path.join(work, "missing", "m.onnx")) else "no file")
    mixed = os.path.join(work, "mixed")
    os.makedirs(mixed)
    for i in range(3):
        float_tiff(os.path.join(mixed, f"case{i}_0000.tif"))
    open(os.path.join(mixed, "z_broken.png"), "wb").write(b"not a png")
    out = os.path.join(work, "pred_mixed")
    result = run(cli("predict", "--model", model_dir, "--input", mixed, "--output", out), work)
    case("predict: 3 good images and an unreadable one", result,
         f"{len(os.listdir(out)) if os.path.isdir(out) else 0} files written")
    os.remove(os.path.join(mixed, "z_broken.png"))
    float_tiff(os.path.join(mixed, "stray name.tif"))
    out = os.path.join(work, "pred_stray")
    run(cli("predict", "--model", model_dir, "--input", mixed, "--output", out), work)
    case("predict: case0_0000..case2_0000 plus 'stray name'", (0, "", False),
         ", ".join(sorted(os.listdir(out))) if os.path.isdir(out) else "")

    # 8. disks (root only)
    if can_mount(work):
        for label, options in (("full (256 KB tmpfs)", "size=256k"), ("read-only", "size=1m,ro")):
            mount = os.path.join(work, "mnt_" + label.split()[0].replace("-", ""))
            os.makedirs(mount)
            subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", mount], check=True)
            try:
                result = run(cli("train", config, "--output", os.path.join(mount, "run")), work)
                left = subprocess.run(["find", mount, "-mindepth", "1"], capture_output=True, text=True).stdout.split()
                used = subprocess.run(["df", "-k", mount], capture_output=True, text=True).stdout.splitlines()[-1].split()[2]
                case(f"train: output on a {label} disk", result,
                     f"left: {[os.path.relpath(p, mount) for p in left][:6]}, {used} KB used")
            finally:
                subprocess.run(["umount", mount])
    else:
        rows.append(("disk cases", "not run", "mounting a tmpfs needs root", ""))

    # a file too large for the file system (as FAT32's 4 GB): model.safetensors fits, training_state.pt not
    weights = os.path.getsize(os.path.join(model_dir, "model.safetensors"))
    out = os.path.join(work, "run_efbig")
    result = run(cli("train", config, "--output", out), work, file_size_limit=weights + 4096)
    left = sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) if os.path.isdir(out) else []
    case(f"train: file-size limit {weights + 4096} bytes (ulimit -f)", result, f"left: {left}")

    # 9. labels
    folders = os.path.join(work, "folders")
    os.makedirs(os.path.join(folders, "images"))
    os.makedirs(os.path.join(folders, "masks"))
    for i in range(6):
        Image.fromarray(np.full((32, 32), 40 * i, np.uint8)).save(os.path.join(folders, "images", f"c{i}.png"))
        Image.fromarray((np.eye(32) * 255).astype(np.uint8)).save(os.path.join(folders, "masks", f"c{i}.png"))
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(os.path.join(folders, "masks", "orphan.png"))
    case("train: a mask without an image",
         run(cli("train", config, "--output", os.path.join(work, "run_orphan"), "-o", "data.format=folders",
                 "-o", f"data.root={folders}", "-o", "data.fold=all"), work))


if __name__ == "__main__":
    main()
