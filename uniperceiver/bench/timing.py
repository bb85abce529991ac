"""Timing helpers: warm-up, repeats, medians; peak memory read from the process or the GPU."""

from __future__ import annotations

import json
import os
import queue
import resource
import subprocess
import statistics
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from typing import IO, Callable

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
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:  # subprocess.run has killed the worker
        raise RuntimeError(f"timed out after {timeout:.0f} s") from None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    raise RuntimeError(tail[0])


def time_pipelined(fn: Callable[[], object], steps: int, device: torch.device) -> float:
    """Mean seconds per call over `steps` calls issued back to back, synchronising once at the end.

    `time_fn` waits for the device after every call, so the host's launch work for one step never
    overlaps the device's work for the previous one; a training loop without host syncs gets that
    overlap. The difference between the two is what launch overhead and host syncs cost.
    """
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / steps


def count_host_syncs(fn: Callable[[], object], device: torch.device) -> int:
    """How many synchronising CUDA calls one `fn()` makes (`.item()`, `bool(tensor)`, `nonzero`...),
    read from torch's sync debug mode; -1 off CUDA. Each one stalls the host until the device has
    drained its queue, so the next launches cannot overlap the device's work."""
    if device.type != "cuda":
        return -1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    _sync(device)
    return sum("synchroniz" in str(w.message) for w in caught)


class ServedCase:
    """A benchmark worker kept alive between its warm-up and its timed runs (`worker.py --serve`).

    Protocol on its standard streams: the worker prints `READY {json}` once built and warmed up
    (compiled), then answers each `time` line on its standard input with `RESULT {json}`, and exits
    on `exit` or end of input. Several can warm up (compile) side by side while their timed runs
    are issued one at a time, so no timing shares the device with another case. Its standard error
    goes to a temporary file, read back for the error message when the worker fails.
    """

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self._stderr: IO[str] = tempfile.TemporaryFile(mode="w+", prefix="bench-worker-")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                     text=True, bufsize=1, env={**os.environ, **(env or {})})
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)  # end of output: the worker has exited

    def expect(self, prefix: str, timeout: float) -> dict:
        """The JSON after the next line starting with `prefix`; RuntimeError (the worker killed) on
        timeout or exit, carrying the last line of the worker's standard error."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise RuntimeError(f"timed out after {timeout:.0f} s: {self.stderr_tail(1) or 'no output'}")
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                code = self.proc.wait()
                raise RuntimeError(f"exited with {code}: {self.stderr_tail(1) or 'no output'}")
            if line.startswith(prefix + " "):
                return json.loads(line[len(prefix) + 1:])

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def stderr_tail(self, lines: int = 30) -> str:
        """The last `lines` lines the worker wrote to its standard error."""
        self._stderr.flush()
        self._stderr.seek(0)
        return "\n".join(self._stderr.read().strip().splitlines()[-lines:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self, timeout: float = 30) -> None:
        """Ask the worker to exit (killing it if it does not) and drop its error log."""
        if self.proc.poll() is None:
            try:
                self.send("exit")
                self.proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        self._stderr.close()
