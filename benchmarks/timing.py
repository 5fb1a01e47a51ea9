"""Timing shared by the benchmark scripts (run them as ``python benchmarks/<name>.py``)."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Tuple

import torch


def timed_pair(fn_a: Callable[[], object], fn_b: Callable[[], object], repeats: int) -> Tuple[float, float]:
    """Median seconds of two functions after one warm-up each, run alternately so that machine noise hits
    both alike; waits for CUDA work to finish before each reading."""
    fn_a(), fn_b()
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times_a), statistics.median(times_b)
