"""The failure audit of issues 11 and 16 as tests (it was benchmarks/audit_failures.py, which printed one
row per case and asserted nothing). Each case runs the command line as a user would, on a bad input, a
damaged file or a disk that cannot take the run, and checks what the user must get: exit code 2 for bad
input (1 for a disk that fails), one line naming the problem, the user's files unchanged and nothing
half-written left behind.

Only the audit cases that no other test checks through the command line are here; the others are covered
where the table of the audit's cases points (the tests marked ``reliability``, export/test_export_onnx.py,
training/test_training_e2e.py). The full and read-only disk cases mount a small tmpfs and need root (they skip
elsewhere); a folder made read-only with chmod stands in for the read-only disk without root, and a
file-size limit (RLIMIT_FSIZE, as ``ulimit -f``) for a file too large for the file system."""
import contextlib
import os
import resource
import shutil
import signal
import subprocess

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from upernet_vit import UperNetViT
from upernet_vit.cli import main
from upernet_vit.runs.checkpoints import checkpoint_epoch
from helpers import TINY_CONFIG, gray, one_error_line, record_8bit, tiny_model

pytestmark = pytest.mark.reliability

# what a refused ``train`` may leave in its new run folder: the folder's marker and the log with the error
REFUSED_RUN = {".upernet-vit-run", "train.log"}


def _config(folder, **train):
    """A 1-epoch tiny run without overlays, written to ``folder/tiny.yaml``; its path."""
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(dict(TINY_CONFIG, train=dict(TINY_CONFIG["train"], num_epochs=1, num_overlays=0,
                                                                  **train))))
    return path


def _snapshot(path):
    """``{relative path: bytes}`` of every file under ``path`` (or of the file ``path``)."""
    path = str(path)
    if os.path.isfile(path):
        return {"": open(path, "rb").read()}
    return {os.path.relpath(os.path.join(d, n), path): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(path) for n in names}


def _box(i=0, value=1):
    mask = np.zeros((32, 32), np.uint8)
    mask[4 + i : 20 + i, 6:22] = value
    return mask


def _folders(root, images, masks):
    """``root/images``, ``root/masks`` from ``{file name: array}`` (the suffix picks the type)."""
    for sub, files in (("images", images), ("masks", masks)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for name, array in files.items():
            Image.fromarray(array).save(root / sub / name)
    return root


def _float_tiff(path, nan=False):
    image = np.random.default_rng(0).random((32, 32), dtype=np.float32)
    if nan:
        image[3, 3] = np.nan
    Image.fromarray(image, mode="F").save(path)


# ---------------------------------------------------------------------------- train: bad data, bad checkpoints
def _nan_pixel(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(6):
        _float_tiff(root / "images" / f"c{i}.tif", nan=i == 5)
        Image.fromarray(np.eye(32, dtype=np.uint8)).save(root / "masks" / f"c{i}.png")
    return ["data.format=folders", f"data.root={root}", "data.fold=all"], root


def _folders_case(make):
    def case(tmp_path):
        root = make(tmp_path / "data")
        return ["data.format=folders", f"data.root={root}", "data.fold=all"], root
    return case


def _orphan(root):
    images = {f"c{i}.png": np.full((32, 32), 40 * i, np.uint8) for i in range(6)}
    masks = {f"c{i}.png": _box(i) for i in range(6)}
    masks["orphan.png"] = np.zeros((32, 32), np.uint8)
    return _folders(root, images, masks)


def _mixed_depths(root):
    images = {f"a{i}.png": np.full((32, 32), 60 + 20 * i, np.uint8) for i in range(3)}
    images.update({f"b{i}.tif": np.full((32, 32), 20000 + 9000 * i, np.uint16) for i in range(3)})
    return _folders(root, images, {f"{n[:2]}.png": _box(i) for i, n in enumerate(sorted(images))})


def _jpeg_masks(root):
    _folders(root, {f"c{i}.png": np.full((32, 32), 50 + 30 * i, np.uint8) for i in range(4)}, {})
    for i in range(4):
        Image.fromarray(_box(i, 254)).save(root / "masks" / f"c{i}.jpg", quality=75)
    return root


def _stray_values(root):
    masks = {f"c{i}.png": _box(i) for i in range(4)}
    masks["c3.png"][0, :3] = [2, 7, 200]
    return _folders(root, {f"c{i}.png": np.full((32, 32), 50 + 30 * i, np.uint8) for i in range(4)}, masks)


def _demo_case(damage):
    def case(tmp_path):
        from upernet_vit.data.demo import write_demo_dataset

        root = write_demo_dataset(str(tmp_path / "Dataset001_Demo"), num_train=6, num_test=0, size=32)
        damage(root)
        return [f"data.root={root}", "data.format=nnunet"], root  # the default fold 0: splits_final.json is read
    return case


def _channel_names(root):
    import json

    path = os.path.join(root, "dataset.json")
    meta = json.loads(open(path).read())
    meta["channel_names"] = {"0": "R", "1": "G", "2": "B"}
    open(path, "w").write(json.dumps(meta))


def _broken_dataset_json(root):
    path = os.path.join(root, "dataset.json")
    text = open(path).read()
    open(path, "w").write(text.replace('"labels": {', '"labels": {,', 1))


def _broken_splits(root):
    open(os.path.join(root, "splits_final.json"), "w").write('[{"train": ["demo_000"], "val": ["demo_001"]}\n{}]')


def _checkpoint_file(content):
    def case(tmp_path):
        path = tmp_path / "backbone.pth"
        if content is None:  # a download cut off after 1000 bytes
            torch.save({"w": torch.ones(1000)}, path)
            path.write_bytes(path.read_bytes()[:1000])
        else:
            path.write_bytes(content)
        return [f"model.checkpoint_path={path}"], path
    return case


@pytest.mark.parametrize("make,words", [
    (_nan_pixel, ["c5.tif", "1 non-finite pixel value"]),
    (_folders_case(_orphan), ["orphan.png", "has no image"]),
    (_folders_case(_mixed_depths), ["different value ranges", "a0.png", "b0.tif"]),
    (_folders_case(_jpeg_masks), ["c0.jpg", "is a JPEG, a lossy format"]),
    (_folders_case(_stray_values), ["data.labels is not set", "2: 1, 7: 1, 200: 1", "c3.png"]),
    (_demo_case(_channel_names), ["dataset.json declares 3 channel(s)", "hold 1"]),
    (_demo_case(_broken_dataset_json), ["dataset.json is not valid JSON", "line 5"]),
    (_demo_case(_broken_splits), ["splits_final.json is not valid JSON", "line 2"]),
    (_checkpoint_file(b"<html>403 Forbidden</html>"), ["backbone.pth", "is not a PyTorch or safetensors checkpoint",
                                                       "<html>"]),
    (_checkpoint_file(b""), ["backbone.pth", "is an empty file"]),
    (_checkpoint_file(None), ["backbone.pth", "is a damaged or truncated torch checkpoint"]),
], ids=["nan-pixel-in-a-float-tiff", "mask-without-image", "8-and-16-bit-images", "jpeg-masks", "stray-mask-values",
        "3-channel-names-1-channel-files", "malformed-dataset-json", "malformed-splits-final-json",
        "checkpoint-path-html-text", "checkpoint-path-empty", "checkpoint-path-truncated"])
def test_bad_training_input_is_one_line_exit_2_before_any_checkpoint(tmp_path, capsys, make, words):
    overrides, given = make(tmp_path)
    config = _config(tmp_path)
    before, config_before = _snapshot(given), config.read_bytes()
    run = tmp_path / "run"
    args = ["train", str(config), "--output", str(run)]
    for item in overrides:
        args += ["-o", item]
    assert main(args) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    for word in words:
        assert word in line, (word, line)
    assert _snapshot(given) == before and config.read_bytes() == config_before
    assert set(os.listdir(run)) <= REFUSED_RUN  # no checkpoint, config.yaml or .tmp folder
    assert line in (run / "train.log").read_text()


def test_config_values_that_cannot_be_run_are_refused_before_the_run_folder(tmp_path, capsys):
    """train.initial_lr .inf (issue 11) and a key given twice in the YAML, where one would silently win."""
    config = _config(tmp_path)
    assert main(["train", str(config), "--output", str(tmp_path / "inf"), "-o", "train.initial_lr=.inf"]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert "train.initial_lr: must be a finite number, got inf" in line
    twice = tmp_path / "twice.yaml"
    twice.write_text(config.read_text().replace("train:\n", "train:\n  num_epochs: 5\n", 1))
    before = twice.read_bytes()
    assert main(["train", str(twice), "--output", str(tmp_path / "twice")]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert "twice.yaml" in line and "'num_epochs' is given twice (lines" in line
    assert twice.read_bytes() == before
    assert not (tmp_path / "inf").exists() and not (tmp_path / "twice").exists()


# ---------------------------------------------------------------------------- predict: damaged model folders
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "m"
    model = tiny_model(in_chans=1, num_classes=2)
    model.preprocessing = record_8bit(model)  # as the trainer writes it
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "b"):
        gray(folder / f"{name}.png", size=(32, 32))
    return folder


def _flip_a_bit(folder):
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-100] ^= 0x01
    (folder / "model.safetensors").write_bytes(bytes(data))


def _truncate(folder):  # and no checksum file, as a folder from before checksums
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:5000])
    (folder / "SHA256SUMS").unlink()


def _edit_config(folder):
    text = (folder / "config.yaml").read_text()
    (folder / "config.yaml").write_text(text.replace("hidden_size: 32", "hidden_size: 24"))


@pytest.mark.parametrize("damage,words", [
    (_flip_a_bit, ["model.safetensors is damaged or was changed after it was saved", "SHA256SUMS records"]),
    (_truncate, ["cannot read", "model.safetensors", "damaged or truncated"]),
    (_edit_config, ["config.yaml is damaged or was changed after it was saved"]),
    (lambda f: (f / "SHA256SUMS").write_bytes(b""), ["SHA256SUMS is damaged", "holds nothing"]),
    (lambda f: (f / "SHA256SUMS").write_bytes(b"\x00\xffnot a checksum"), ["SHA256SUMS is damaged", r"b'\x00\xffnot'"]),
], ids=["flipped-bit", "truncated-weights-no-checksum", "edited-config", "empty-sha256sums", "garbage-sha256sums"])
def test_predict_with_a_damaged_model_folder_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, model_folder,
                                                                                   images, damage, words):
    folder = tmp_path / "damaged"
    shutil.copytree(model_folder, folder)
    damage(folder)
    before, inputs = _snapshot(folder), _snapshot(images)
    out = tmp_path / "out"
    assert main(["predict", "--model", str(folder), "--input", str(images), "--output", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err, "predict")
    assert str(folder) in line
    for word in words:
        assert word in line, (word, line)
    assert _snapshot(folder) == before and _snapshot(images) == inputs  # not "repaired", not touched
    assert not out.exists()


def test_predict_with_an_unreadable_image_among_good_ones_names_it_and_writes_nothing(tmp_path, capsys, model_folder):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(3):
        gray(inputs / f"case{i}_0000.png", size=(32, 32))
    (inputs / "z_broken.png").write_bytes(b"not a png")  # sorted last: read after the good ones
    before = _snapshot(inputs)
    out = tmp_path / "out"
    assert main(["predict", "--model", str(model_folder), "--input", str(inputs), "--output", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err, "predict")
    assert "cannot read image file" in line and "z_broken.png" in line
    assert _snapshot(inputs) == before and not out.exists()


# ---------------------------------------------------------------------------- disks that cannot take the run
def _checkpoints_left(run):
    return sorted(n for n in os.listdir(run) if n.startswith("checkpoint"))


@contextlib.contextmanager
def _file_size_limit(limit):
    """RLIMIT_FSIZE (``ulimit -f``) on this process's soft limit, restored after; no root needed. Python
    ignores SIGXFSZ, so a write past the limit fails with EFBIG instead of killing the process."""
    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_file_too_large_for_the_file_system_is_one_line_and_leaves_no_partial_checkpoint(tmp_path, capsys):
    """As FAT32's 4 GB: the tiny run's model.safetensors (~0.5 MB) fits under the limit, its training_state.pt
    (~1 MB, written by torch's zip writer) does not."""
    config = _config(tmp_path)
    before = config.read_bytes()
    run = tmp_path / "run"
    with _file_size_limit(700_000):
        code = main(["train", str(config), "--output", str(run)])
    assert code == 1
    line = one_error_line(capsys.readouterr().err, "train")
    assert f"'{run / 'checkpoint_latest'}': the file is too large for this file system" in line and "ulimit -f" in line
    assert _checkpoints_left(run) == [] and not any(n.endswith((".tmp", ".old")) for n in os.listdir(run))
    assert config.read_bytes() == before and line in (run / "train.log").read_text()


def _can_mount():
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    import tempfile

    with tempfile.TemporaryDirectory() as probe:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", probe], capture_output=True).returncode:
            return False
        subprocess.run(["umount", probe], check=True)
    return True


needs_mount = pytest.mark.skipif(not _can_mount(), reason="mounting a small tmpfs needs root (and a mount command)")


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(options)``: a tmpfs mounted under ``tmp_path``, unmounted after the test."""
    mounted = []

    def mount(options):
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], check=True)
        mounted.append(point)
        return point

    yield mount
    # the files the command line left open there (train.log's handler, a refused run's lock) keep the mount busy
    import gc
    import logging

    from upernet_vit.cli import CLI_HANDLER

    package = logging.getLogger("upernet_vit")
    for handler in [h for h in package.handlers if h.get_name() == CLI_HANDLER]:
        package.removeHandler(handler)
        handler.close()
    gc.collect()
    for point in mounted:
        if subprocess.run(["umount", str(point)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(point)], check=True)  # lazily: never left mounted
            print(f"{point}: busy, unmounted lazily")


def _remount(point, options):
    subprocess.run(["mount", "-o", f"remount,{options}", str(point)], check=True)


@needs_mount
def test_a_full_disk_is_one_line_leaves_no_partial_checkpoint_and_the_same_command_runs_once_freed(tmp_path, capsys,
                                                                                                   tmpfs):
    config = _config(tmp_path)
    disk = tmpfs("size=256k")
    run = disk / "run"
    assert main(["train", str(config), "--output", str(run)]) == 1
    line = one_error_line(capsys.readouterr().err, "train")
    assert f"'{run / 'checkpoint_latest'}': no space left on the device" in line
    assert _checkpoints_left(run) == [] and not any(n.endswith((".tmp", ".old")) for n in os.listdir(run))
    assert line in (run / "train.log").read_text()
    _remount(disk, "size=16m")  # space freed: what the failed run left does not stand in the way
    assert main(["train", str(config), "--output", str(run)]) == 0
    assert _checkpoints_left(run) == ["checkpoint_best", "checkpoint_latest"]


@needs_mount
def test_a_read_only_disk_is_one_line_and_nothing_is_written(tmp_path, capsys, tmpfs):
    config = _config(tmp_path)
    disk = tmpfs("size=1m,ro")
    assert main(["train", str(config), "--output", str(disk / "run")]) == 1
    line = one_error_line(capsys.readouterr().err, "train")
    assert f"'{disk / 'run'}': the file system is read-only" in line
    assert os.listdir(disk) == []


def _permissions_hold():
    """Whether a folder without write permission stops this process (root, or CAP_DAC_OVERRIDE, writes anyway)."""
    import tempfile

    with tempfile.TemporaryDirectory() as probe:
        os.chmod(probe, 0o555)
        try:
            os.mkdir(os.path.join(probe, "x"))
        except PermissionError:
            return True
        finally:
            os.chmod(probe, 0o755)
    return False


@pytest.mark.skipif(not _permissions_hold(), reason="root writes into a folder without write permission anyway")
def test_a_folder_without_write_permission_is_one_line_and_nothing_is_written(tmp_path, capsys):
    config = _config(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["train", str(config), "--output", str(locked / "run")]) == 1
        line = one_error_line(capsys.readouterr().err, "train")
        assert f"'{locked / 'run'}': permission denied" in line
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o755)


@needs_mount
def test_a_disk_full_while_copying_the_best_keeps_the_latest_and_resume_finishes(tmp_path, capsys, tmpfs):
    """Issue 16: the copy of checkpoint_latest to checkpoint_best fails for lack of space."""
    config = _config(tmp_path)
    reference = tmp_path / "reference"
    assert main(["train", str(config), "--output", str(reference)]) == 0
    capsys.readouterr()
    size = sum(os.path.getsize(reference / "checkpoint_latest" / n) for n in os.listdir(reference / "checkpoint_latest"))
    disk = tmpfs(f"size={int(size * 1.5) // 4096 * 4096 + 65536}")  # room for one checkpoint and a half
    run = disk / "run"
    assert main(["train", str(config), "--output", str(run)]) == 1
    line = one_error_line(capsys.readouterr().err, "train")
    assert f"'{run / 'checkpoint_best'}': no space left on the device" in line  # the folder written, not the source
    assert _checkpoints_left(run) == ["checkpoint_latest"]  # no partial checkpoint_best(.tmp)
    assert checkpoint_epoch(str(run / "checkpoint_latest")) == 1
    UperNetViT.from_pretrained(run / "checkpoint_latest")  # whole, its checksums agree
    _remount(disk, "size=16m")
    assert main(["train", str(config), "--output", str(run), "--resume"]) == 0
    assert _checkpoints_left(run) == ["checkpoint_best", "checkpoint_latest"]
    assert checkpoint_epoch(str(run / "checkpoint_best")) == 1
