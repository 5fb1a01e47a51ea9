"""Black-box audit of failure behaviour (issues 11 and 16): bad inputs, damaged files, full and read-only
disks, flags out of range, inputs in other file types, outputs over inputs.

    python benchmarks/audit_failures.py [--work /tmp/audit] [--only 16]

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
import time

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


def run(args, cwd, stdin=None, file_size_limit=None, timeout=None):
    env = dict(os.environ)
    limit = None if file_size_limit is None else (
        lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit)))
    try:
        result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, input=stdin, preexec_fn=limit,
                                timeout=timeout)
    except subprocess.TimeoutExpired:
        return "-", f"still running after {timeout} s (stopped)", False
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
    parser.add_argument("--only", choices=["16"], help="only the issue-16 cases (after the setup run)")
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
    issue16(work, config, run_dir, case)
    if args.only:
        return

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
        for sums in ("SHA256SUMS", "model.safetensors.sha256"):  # the newer folders' and the older ones'
            if os.path.exists(os.path.join(folder, sums)):
                os.remove(os.path.join(folder, sums))

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


def gray_png(path, value=100, size=(32, 32), dtype=np.uint8):
    Image.fromarray(np.full(size, value, dtype=dtype)).save(path)


def folders_dataset(root, images, masks):
    """``root/images``, ``root/masks`` from ``{file name: array}``."""
    for sub, files in (("images", images), ("masks", masks)):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
        for name, array in files.items():
            Image.fromarray(array).save(os.path.join(root, sub, name))
    return root


def box_mask(i=0, value=1):
    mask = np.zeros((32, 32), np.uint8)
    mask[4 + i : 20 + i, 6:22] = value
    return mask


def train_folders(config, work, name, root, *overrides, timeout=None):
    out = os.path.join(work, name)
    args = ["train", config, "--output", out, "-o", "data.format=folders", "-o", f"data.root={root}", "-o", "data.fold=all"]
    for item in overrides:
        args += ["-o", item]
    return run(cli(*args), work, timeout=timeout), out


def probs_of(folder, case):
    path = os.path.join(folder, f"{case}_probs.npz")
    return np.load(path)["probabilities"].astype(np.float32) if os.path.isfile(path) else None


def issue16(work, config, run_dir, case):
    """The cases of issue 16 (reliability, round 2)."""
    from upernet_vit.data.demo import demo_case

    model_dir = os.path.join(run_dir, "checkpoint_latest")
    # 1. the same pixels in another container
    pixels = np.round(demo_case(999, 32)[0][0] * 255).astype(np.uint8)
    for name, array, suffix in (("png8", pixels, ".png"), ("tif32", pixels.astype(np.float32), ".tif")):
        os.makedirs(os.path.join(work, "same_" + name))
        Image.fromarray(array).save(os.path.join(work, "same_" + name, "case" + suffix))
        run(cli("predict", "--model", model_dir, "--input", os.path.join(work, "same_" + name), "--output",
                os.path.join(work, "pred_same_" + name), "--probabilities"), work)
    a, b = probs_of(os.path.join(work, "pred_same_png8"), "case"), probs_of(os.path.join(work, "pred_same_tif32"), "case")
    diff = "n/a" if a is None or b is None else f"max |p(PNG) - p(float TIFF)| = {np.abs(a - b).max():.3g}, " \
        f"classes differ at {100 * np.mean(a.argmax(0) != b.argmax(0)):.0f}% of pixels"
    case("16.1 predict: same pixels as 8-bit PNG and as float32 TIFF (values 0-255)", (0, "", False), diff)
    images = {f"a{i}.png": np.full((32, 32), 60 + 20 * i, np.uint8) for i in range(3)}
    images.update({f"b{i}.tif": np.full((32, 32), 20000 + 9000 * i, np.uint16) for i in range(3)})
    root = folders_dataset(os.path.join(work, "mixed_depth"), images, {f"{n[:2]}.png": box_mask(i) for i, n in
                                                                     enumerate(sorted(images))})
    result, out = train_folders(config, work, "run_mixed_depth", root)
    case("16.1 train: three 8-bit and three 16-bit images in one folder", result,
         "trained" if os.path.isdir(os.path.join(out, "checkpoint_latest")) else "nothing trained")

    # 2. --step and --scales
    inputs = os.path.join(work, "three")
    os.makedirs(inputs)
    for i in range(3):
        Image.fromarray(np.round(demo_case(900 + i, 96)[0][0] * 255).astype(np.uint8)).save(os.path.join(inputs, f"c{i}.png"))
    for flag, value in (("--step", "2"), ("--step", "0"), ("--step", "-1"), ("--step", "0.01"), ("--scales", "100")):
        out = os.path.join(work, f"pred_{flag[2:]}_{value}")
        result = run(cli("predict", "--model", model_dir, "--input", inputs, "--output", out, flag, value,
                         "--probabilities"), work, timeout=90)
        p = probs_of(out, "c0")
        left = "no output" if p is None else f"{100 * np.mean(np.isnan(p).any(0)):.0f}% of c0's pixels NaN"
        case(f"16.2 predict {flag} {value} (three 96 px images)", result, left)

    # 3. a run without a best: killed in epoch 2 of 50, validation every 50 epochs
    stopped = os.path.join(work, "run_stopped")
    proc = subprocess.Popen(cli("train", config, "--output", stopped, "-o", "train.num_epochs=50", "-o",
                                "train.val_every=50"), cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = os.path.join(stopped, "checkpoint_latest", "training_state.pt")
    while not os.path.isfile(state) and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    for command in (["predict", "--model", stopped, "--input", inputs, "--output", os.path.join(work, "pred_nobest")],
                    ["export", stopped, "--output", os.path.join(work, "nobest.onnx"), "--no-check"]):
        result = run(cli(*command, "--checkpoint", "best"), work)
        written = os.path.exists(os.path.join(work, "pred_nobest")) or os.path.exists(os.path.join(work, "nobest.onnx"))
        case(f"16.3 {command[0]} --checkpoint best, run stopped before its first validation", result,
             "output written" if written else "nothing written")
    stale = os.path.join(work, "run_stale")
    crash = f"""
        import os, sys
        from upernet_vit.config import load_config
        from upernet_vit.runs import checkpoints
    from upernet_vit.training import trainer as t
        from upernet_vit.runs.checkpoints import checkpoint_epoch
        real = checkpoints.copy_checkpoint
        def copy(source, final):
            if checkpoint_epoch(source) == 2:
                os._exit(9)  # killed between checkpoint_latest and checkpoint_best
            real(source, final)
        t.copy_checkpoint = checkpoints.copy_checkpoint = copy  # older trainers imported it by name
        class Better(t.Trainer):
            def validate(self, write_overlays=False):
                return {{**super().validate(write_overlays), "dice_mean": 0.1 * (len(self.history) + 1)}}
        Better(load_config({config!r}), {stale!r}).run()
    """
    with open(config, encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    cfg["train"]["num_epochs"] = 3
    write_yaml = os.path.join(work, "three_epochs.yaml")
    with open(write_yaml, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f)
    run(python(crash.replace(repr(config), repr(write_yaml))), work)
    for name in ("checkpoint_best", "checkpoint_latest"):
        run(cli("predict", "--model", os.path.join(stale, name), "--input", inputs, "--output",
                os.path.join(work, "pred_stale_" + name), "--probabilities"), work)
    best, latest = (probs_of(os.path.join(work, "pred_stale_" + n), "c0") for n in ("checkpoint_best", "checkpoint_latest"))
    used = "n/a" if best is None or latest is None else (
        "the best epoch (2)" if np.array_equal(best, latest) else "the stale epoch (1)")
    case("16.3 predict --model RUN/checkpoint_best after a kill between the two writes", (0, "", False), f"predicted with {used}")

    # 4. the output folder
    over = os.path.join(work, "over")
    shutil.copytree(inputs, over)
    before = {n: open(os.path.join(over, n), "rb").read() for n in os.listdir(over)}
    result = run(cli("predict", "--model", model_dir, "--input", over, "--output", over), work)
    changed = sum(open(os.path.join(over, n), "rb").read() != b for n, b in before.items())
    case("16.4 predict --output equal to --input", result, f"{changed} of {len(before)} input images replaced")
    truth = os.path.join(work, "truth")
    os.makedirs(truth)
    for i in range(3):
        Image.fromarray(box_mask(i)).save(os.path.join(truth, f"c{i}.png"))
    before = {n: open(os.path.join(truth, n), "rb").read() for n in os.listdir(truth)}
    result = run(cli("predict", "--model", model_dir, "--input", inputs, "--output", truth), work)
    changed = sum(open(os.path.join(truth, n), "rb").read() != b for n, b in before.items())
    case("16.4 predict --output is a ground-truth folder", result, f"{changed} of {len(before)} label files replaced")

    # labels
    images = {f"c{i}.png": np.full((32, 32), 50 + 30 * i, np.uint8) for i in range(4)}
    root = folders_dataset(os.path.join(work, "jpeg_masks"), images, {})
    for i in range(4):
        Image.fromarray(box_mask(i, 254)).save(os.path.join(root, "masks", f"c{i}.jpg"), quality=75)
    result, out = train_folders(config, work, "run_jpeg", root)
    prep = os.path.join(out, "checkpoint_latest", "preprocessing.json")
    classes = len(json.load(open(prep))["label_values"]) if os.path.isfile(prep) else None
    case("16.L train: masks saved as JPEG (0/254 boxes), no data.labels", result,
         f"trained a {classes}-class model" if classes else "nothing trained")
    stray = {f"c{i}.png": box_mask(i) for i in range(4)}
    stray["c3.png"][0, :3] = [2, 7, 200]
    root = folders_dataset(os.path.join(work, "stray"), images, stray)
    result, out = train_folders(config, work, "run_stray", root)
    prep = os.path.join(out, "checkpoint_latest", "preprocessing.json")
    classes = len(json.load(open(prep))["label_values"]) if os.path.isfile(prep) else None
    case("16.L train: masks 0/1 with stray values 2, 7, 200, no data.labels", result,
         f"trained a {classes}-class model" if classes else "nothing trained")
    root = folders_dataset(os.path.join(work, "absent"), images, {f"c{i}.png": box_mask(i) for i in range(4)})
    result, out = train_folders(config, work, "run_absent", root, "data.labels={background: 0, cell: 1, nucleus: 2}",
                                "train.num_epochs=2")
    log = os.path.join(out, "train.log")
    warned = os.path.isfile(log) and "no training mask" in open(log).read()
    best = os.path.isdir(os.path.join(out, "checkpoint_best"))
    case("16.L train: data.labels declares 'nucleus', which no mask holds", result,
         f"warned: {'yes' if warned else 'no'}; checkpoint_best: {'yes' if best else 'no'}")
    from upernet_vit.data.demo import write_demo_dataset

    demo = write_demo_dataset(os.path.join(work, "Dataset001_Demo"), num_train=6, num_test=0, size=32)
    meta = json.load(open(os.path.join(demo, "dataset.json")))
    meta["channel_names"] = {"0": "R", "1": "G", "2": "B"}
    json.dump(meta, open(os.path.join(demo, "dataset.json"), "w"))
    result = run(cli("train", config, "--output", os.path.join(work, "run_channels"), "--data", demo, "--fold", "all"), work)
    case("16.L train: dataset.json lists 3 channel_names, files hold 1", result)

    # unclear errors
    text = open(os.path.join(demo, "dataset.json")).read()
    open(os.path.join(demo, "dataset.json"), "w").write(text.replace('"labels": {', '"labels": {,', 1))
    case("16.E train: malformed dataset.json",
         run(cli("train", config, "--output", os.path.join(work, "run_badjson"), "--data", demo), work))
    demo2 = write_demo_dataset(os.path.join(work, "Dataset002_Demo"), num_train=6, num_test=0, size=32)
    open(os.path.join(demo2, "splits_final.json"), "w").write('[{"train": ["demo_000"], "val": ["demo_001"]}\n{}]')
    case("16.E train: malformed splits_final.json",
         run(cli("train", config, "--output", os.path.join(work, "run_badsplits"), "--data", demo2), work))
    labels = os.path.join(work, "labels.json")
    open(labels, "w").write('{"background": 0,\n "tumor": 1,\n}')
    case("16.E evaluate --labels with a trailing comma",
         run(cli("evaluate", "--pred", truth, "--gt", truth, "--labels", labels), work))
    lora = f"""
        import sys
        sys.modules["peft"] = None  # peft not installed
        from upernet_vit.cli import main
        sys.exit(main(["train", {config!r}, "--output", {os.path.join(work, "run_lora")!r}, "-o", "lora.enabled=true"]))
    """
    case("16.E train: lora.enabled without peft installed", run(python(lora), work))
    case("16.E predict --device cuda on a machine without a GPU",
         run(cli("predict", "--model", model_dir, "--input", inputs, "--output", os.path.join(work, "pred_cuda"),
                 "--device", "cuda"), work))
    for label, content in (("empty", b""), ("garbage", b"\x00\xffnot a checksum")):
        folder = os.path.join(work, "sha_" + label)
        shutil.copytree(model_dir, folder)
        open(os.path.join(folder, "SHA256SUMS"), "wb").write(content)
        case(f"16.E predict: {label} SHA256SUMS",
             run(cli("predict", "--model", folder, "--input", inputs, "--output", os.path.join(work, "pred_" + label)), work))
    if can_mount(work):
        size = sum(os.path.getsize(os.path.join(model_dir, n)) for n in os.listdir(model_dir))
        mount = os.path.join(work, "mnt_best")
        os.makedirs(mount)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5) // 4096 * 4096 + 65536}", "tmpfs", mount],
                       check=True)
        try:
            case("16.E train: disk full while copying checkpoint_latest to checkpoint_best",
                 run(cli("train", config, "--output", os.path.join(mount, "run")), work))
        finally:
            subprocess.run(["umount", mount])
    resave = f"""
        import os
        from upernet_vit import UperNetViT
        model = UperNetViT.from_pretrained({model_dir!r})
        model.save_pretrained({os.path.join(work, "resaved")!r})
        print(sorted(os.listdir({os.path.join(work, "resaved")!r})))
    """
    run(python(resave), work)
    kept = os.path.isfile(os.path.join(work, "resaved", "preprocessing.json"))
    case("16.E from_pretrained + save_pretrained of a trained model", (0, "", False),
         "preprocessing.json kept" if kept else "preprocessing.json dropped")
    big = os.path.join(work, "big")
    os.makedirs(big)
    gray_png(os.path.join(big, "big.png"), size=(768, 768))
    command = " ".join(cli("predict", "--model", model_dir, "--input", big, "--output", os.path.join(work, "pred_big")))
    shown = subprocess.run(["script", "-qec", "stty cols 120 rows 40; " + command.replace("import sys; from upernet_vit.cli import main; "
                                                              "sys.exit(main())", "'import sys; from upernet_vit.cli "
                                                              "import main; sys.exit(main())'"), "/dev/null"],
                           cwd=work, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    bar = [line for line in shown.stdout.replace("\r", "\n").splitlines() if "window/s" in line or "case/s" in line]
    case("16.E predict a 768 x 768 image on a terminal (32 px patches)", (shown.returncode, "", False),
         f"progress shown: {bar[-1].strip()[:70]!r}" if bar else "no progress within the image")
    kill = f"""
        from upernet_vit.config import load_config
        from upernet_vit.runs import checkpoints
    from upernet_vit.training import trainer as t
        from upernet_vit.runs.checkpoints import checkpoint_epoch
        real = checkpoints.write_folder_atomically
        def write(final, content):
            if final.endswith("checkpoint_latest") and checkpoint_epoch(final) == 1:
                raise SystemExit(9)  # killed while epoch 2's checkpoint is written
            real(final, content)
        t.write_folder_atomically = checkpoints.write_folder_atomically = write  # older trainers: by name
        t.Trainer(load_config({write_yaml!r}), {os.path.join(work, "run_order")!r}).run()
    """
    run(python(kill), work)
    rows = len(open(os.path.join(work, "run_order", "metrics.csv")).read().strip().splitlines()) - 1
    import torch

    epoch = torch.load(os.path.join(work, "run_order", "checkpoint_latest", "training_state.pt"), weights_only=True)["epoch"]
    case("16.E train killed between epoch 2's metrics row and its checkpoint", (0, "", False),
         f"metrics.csv rows: {rows}, checkpoint_latest epoch: {epoch}")


if __name__ == "__main__":
    main()
