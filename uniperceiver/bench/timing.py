"""Timing helpers: warm-up, repeats, medians; peak memory read from the process or the GPU."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    median_s: float
    min_s: float
    repeats: int

    def per_second(self, work: float) -> float:
        return work / self.median_s if self.median_s > 0 else float("inf")


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], warmup: int = 1, repeats: int = 3, device: torch.device | None = None) -> Timing:
    """Run `fn` warm-up times, then `repeats` timed times; medians resist a noisy machine."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), min(times), repeats)


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-memory high-water mark (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident memory since start or the last `reset_peak_rss`."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize()


def matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32,
                      sizes: tuple[int, ...] = (1024, 2048, 3072), repeats: int = 5) -> float:
    """Measured matrix-multiply throughput (FLOP/s): the denominator of model FLOP utilisation.

    The best of the per-size medians: a peak is what the hardware reaches at its best shape, and a
    single 2048 x 2048 product sometimes ran slower than the model's own matmuls (MFU above 1).
    """
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        t = time_fn(lambda: a @ b, warmup=2, repeats=repeats, device=device)
        best = max(best, 2 * n**3 / t.median_s)
    return best


def run_for_result(cmd: list[str], timeout: float = 900, env: dict[str, str] | None = None) -> dict:
    """Run a benchmark worker in a fresh interpreter and return the JSON of its `RESULT ...` line.

    A fresh process per case keeps peak-memory figures separate; failures raise RuntimeError
    carrying the worker's last error line.
    """
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    raise RuntimeError(tail[0])
