"""benchmarks/gpu.sh, the prepared GPU run: its dry run names every GPU row of docs/results.md with the
command that fills it, and its CPU fallback runs every step end to end (slow: about 1.5 minutes on 2 cores)."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from helpers import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "gpu.sh")
SECTIONS = ("### Large backbones on one GPU", "### Head against HF's, bf16",
            "### Whole-model training throughput, bf16", "### A short demo training run, bf16")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="gpu.sh is a bash script")


def _run(args, tmp_path, **env):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable, "WEIGHTS_DIR": str(tmp_path / "weights"), **env})


def test_the_dry_run_lists_every_gpu_row_with_the_command_that_fills_it(tmp_path):
    out = tmp_path / "dry"
    proc = _run(["--dry-run", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    page = (out / "gpu_results.md").read_text()
    for section in SECTIONS:
        assert section in page
    assert page.count("not yet measured: `bash benchmarks/gpu.sh`") == 7  # 3 large rows, head, 2 throughput, demo
    for name in ("vit_l", "vit_g", "dinov3_7b"):
        assert f"--rows {name} " in page
    # every script a command runs exists
    scripts = set(re.findall(r"benchmarks/\w+\.py", page))
    assert scripts == {"benchmarks/model_memory.py", "benchmarks/head_vs_hf.py", "benchmarks/train_throughput.py"}
    assert all(os.path.isfile(os.path.join(REPO_ROOT, s)) for s in scripts)
    assert "--device cuda --dtype bf16" in page and "--hf-head" in page and "train.amp=bf16" in page
    assert not (tmp_path / "weights").exists()  # a dry run writes no weights


def test_an_unknown_option_is_refused_by_name(tmp_path):
    proc = _run(["--gpu", str(tmp_path / "x")], tmp_path)
    assert proc.returncode == 2
    assert "unknown option --gpu" in proc.stderr


@pytest.mark.slow
def test_the_cpu_fallback_runs_every_step(tmp_path):
    out = tmp_path / "smoke"
    proc = _run([str(out)], tmp_path, DEVICE="cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    page = (out / "gpu_results.md").read_text()
    assert "**CPU smoke run.**" in page
    steps = re.findall(r"^\| (\w+) \| ([^|]+) \|", page.split("### Steps", 1)[1], flags=re.M)[1:]  # [0]: the header
    assert [name for name, _ in steps] == ["head_vs_hf", "throughput_0", "weights_smoke", "large_smoke", "demo_train"]
    assert all(status.strip() == "ok" for _, status in steps), steps
    for section in SECTIONS:
        assert section in page
    # each table has its figures: three set-ups of the large table, three models against HF's head, one epoch
    assert page.count("| ViT-S/16 (DINOv3), 64 px, batch 1 [smoke run] |") == 3
    assert re.search(r"^\| HF head \| bf16 \| [\d.]+ \| 1\.00x \|", page, flags=re.M)
    assert re.search(r"^\| 1 \| [\d.]+ \| [\d.]+ \|", page, flags=re.M)
    assert os.path.isfile(tmp_path / "weights" / "dinov3_small_random_bf16.safetensors")
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == ["dinov3_small_random_bf16.safetensors"]  # no temporary left
