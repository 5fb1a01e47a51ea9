"""Timing shared by the benchmark scripts (run them as ``python benchmarks/<name>.py``)."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, List, Sequence

import torch


def timed(fns: Sequence[Callable[[], object]], repeats: int) -> List[float]:
    """Median seconds of each function after one warm-up each, run in turn so that machine noise hits
    all alike; waits for CUDA work to finish before each reading."""
    for fn in fns:
        fn()
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, samples in zip(fns, times):
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]



def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name and vector extensions from /proc/cpuinfo (figures differ
    between CPU kinds: the same "AMD EPYC" comes with and without AVX-512)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name") and not name:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [label for flag, label in (("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16"))
           if flag in flags] or (["AVX2, no AVX-512"] if "avx2" in flags else [])
    name = name or platform.processor() or platform.machine()
    return f"{name} ({', '.join(isa)})" if isa else name
