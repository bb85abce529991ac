"""The `upctl bench` suite: each case measured in a fresh process, ratios within one run.

Sections: matrix-multiply peak (the MFU denominator), training steps of ours vs BertModel / timm ViT,
activation-checkpointing memory, caption decoding with and without the key/value cache, loader
throughput (images, 8-frame video vs a bare PyAV decode), evaluation with and without the target
cache, and the growth of retrieval scoring and corpus streaming at 1x / 4x / 16x the work.
"""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from uniperceiver.bench.timing import matmul_peak_flops, run_for_result
from uniperceiver.errors import UpctlError

Progress = Callable[[int, int | None, str], None]


@dataclass
class BenchReport:
    machine: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, section: str, name: str, **values: Any) -> None:
        self.rows.append({"section": section, "name": name, **values})

    def to_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "rows": self.rows}


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_case_in_subprocess(spec: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    """One training-step case in a fresh interpreter; returns its result dict."""
    cmd = [sys.executable, "-m", "uniperceiver.bench.worker", json.dumps(spec)]
    try:
        return run_for_result(cmd, timeout)
    except RuntimeError as exc:
        raise UpctlError(f"benchmark case {spec} failed: {exc}") from None


def step_cases(quick: bool, sizes: list[str]) -> list[dict[str, Any]]:
    """Training-step cases: for each size, text / image / video / caption batches, plus the baselines."""
    cases: list[dict[str, Any]] = []
    for size in sizes:
        b_text, t_len = (4, 64) if quick else (8, 128)
        b_img = 2 if quick else 8
        cases += [
            dict(impl="ours", size=size, kind="text", batch=b_text, text_len=t_len),
            dict(impl="bert", size=size, kind="text", batch=b_text, text_len=t_len),
            dict(impl="ours", size=size, kind="image", batch=b_img, frames=1),
            dict(impl="timm-vit", size=size, kind="image", batch=b_img, frames=1),
        ]
        if not quick:
            cases += [
                dict(impl="ours", size=size, kind="video", batch=2, frames=4),
                dict(impl="ours", size=size, kind="caption", batch=b_img, frames=1, text_len=30),
            ]
    return cases


def run_training_steps(report: BenchReport, device: torch.device, quick: bool, sizes: list[str],
                       peak: float, progress: Progress | None = None) -> None:
    cases = step_cases(quick, sizes)
    repeats = 2 if quick else 3
    results: dict[tuple, dict] = {}
    for i, spec in enumerate(cases):
        if progress:
            progress(i, len(cases), "training steps")
        res = run_case_in_subprocess({**spec, "device": str(device), "repeats": repeats, "warmup": 1})
        results[(spec["impl"], spec["size"], spec["kind"])] = res
        report.add(
            "train_step",
            f"{spec['impl']} {spec['size']} {spec['kind']}",
            batch=spec["batch"],
            median_s=round(res["median_s"], 4),
            samples_per_s=round(res["samples_per_s"], 3),
            tokens_per_s=round(res["tokens_per_s"], 1),
            gflops_per_s=round(res["achieved_flops"] / 1e9, 2),
            mfu=round(res["achieved_flops"] / peak, 3),
            peak_mem_mb=round(res["peak_mem_bytes"] / 2**20, 1),
        )
    if progress:
        progress(len(cases), len(cases), "training steps")
    for size in sizes:
        for kind, base in (("text", "bert"), ("image", "timm-vit")):
            ours, theirs = results.get(("ours", size, kind)), results.get((base, size, kind))
            if ours and theirs:
                report.add("ratio", f"ours/{base} {size} {kind}", ratio=round(ours["samples_per_s"] / theirs["samples_per_s"], 3))


def run_checkpointing_memory(report: BenchReport, device: torch.device, size: str, quick: bool) -> None:
    """Peak step memory of the training step with and without activation checkpointing."""
    # Batch 32 x 128 tokens: at pre-training batch sizes (the reference uses 512 text sequences per
    # GPU) activations, which checkpointing drops, dominate the step's memory over the gradients.
    spec = dict(impl="ours", size=size, kind="text", batch=16 if quick else 32, text_len=128, repeats=1, warmup=0,
                device=str(device))
    plain = run_case_in_subprocess({**spec, "checkpointing": False})
    ckpt = run_case_in_subprocess({**spec, "checkpointing": True})
    report.add("memory", f"activation checkpointing {size}, batch {spec['batch']} x 128 tokens",
               peak_mem_mb_plain=round(plain["peak_mem_bytes"] / 2**20, 1),
               peak_mem_mb_ckpt=round(ckpt["peak_mem_bytes"] / 2**20, 1),
               step_mem_mb_plain=round(plain["step_mem_bytes"] / 2**20, 1),
               step_mem_mb_ckpt=round(ckpt["step_mem_bytes"] / 2**20, 1),
               fwd_bwd_mem_mb_plain=round(plain["fwd_bwd_mem_bytes"] / 2**20, 1),
               fwd_bwd_mem_mb_ckpt=round(ckpt["fwd_bwd_mem_bytes"] / 2**20, 1),
               reduction=round(1 - ckpt["fwd_bwd_mem_bytes"] / max(plain["fwd_bwd_mem_bytes"], 1), 3),
               slowdown=round(ckpt["median_s"] / plain["median_s"], 3))


def run_suite(device: torch.device, quick: bool = True, sizes: list[str] | None = None,
              sections: list[str] | None = None, progress: Progress | None = None) -> BenchReport:
    sizes = sizes or (["tiny", "base"] if quick else ["tiny", "small", "base"])
    sections = sections or ["peak", "train", "memory", "decode", "loader", "eval", "scale"]
    report = BenchReport(machine_info(device))
    peak = matmul_peak_flops(device)
    report.add("peak", "matmul fp32", gflops_per_s=round(peak / 1e9, 2))
    if "train" in sections:
        run_training_steps(report, device, quick, sizes, peak, progress)
    if "memory" in sections:
        run_checkpointing_memory(report, device, "base", quick)
    extra = _optional_sections()
    for name in ("decode", "loader", "eval", "scale"):
        if name in sections and name in extra:
            extra[name](report, device, quick)
    return report


def _optional_sections() -> dict[str, Callable[[BenchReport, torch.device, bool], None]]:
    """Sections living in their own modules (decoding, loaders, evaluation, scaling)."""
    from uniperceiver.bench import more

    return more.SECTIONS
