"""The `upctl bench` suite: each case measured in a fresh process, ratios within one run.

Sections: matrix-multiply peak (the MFU denominator), training steps of ours vs BertModel / timm ViT,
activation-checkpointing memory, caption decoding with and without the key/value cache, loader
throughput (images, 8-frame video vs a bare PyAV decode), evaluation with and without the target
cache, and the growth of retrieval scoring and corpus streaming at 1x / 4x / 16x the work.
"""

from __future__ import annotations

import json
import platform
import statistics
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


def run_case_in_subprocess(spec: dict[str, Any], timeout: float = 900,
                           env: dict[str, str] | None = None) -> dict[str, Any]:
    """One training-step case in a fresh interpreter (extra environment variables in `env`)."""
    cmd = [sys.executable, "-m", "uniperceiver.bench.worker", json.dumps(spec)]
    try:
        return run_for_result(cmd, timeout, env)
    except RuntimeError as exc:
        raise UpctlError(f"benchmark case {spec} failed: {exc}") from None


@dataclass
class StepPair:
    """Our step and, where one exists, the established implementation's step at the same shapes."""

    ours: dict[str, Any]
    theirs: dict[str, Any] | None
    rounds: int


# Batch shapes per device: on a 2-core CPU a step of base must stay near seconds; on a GPU the batch
# must be large enough to keep the matrix units busy (about the reference's per-GPU batch sizes).
CPU_SHAPES = {"text": (8, 128), "image": 8, "video": (2, 4), "caption": (8, 30), "retrieval": (8, 30)}
QUICK_CPU_SHAPES = {"text": (4, 64), "image": 2}
GPU_SHAPES = {"text": (256, 128), "image": 128, "video": (16, 8), "caption": (128, 30), "retrieval": (256, 30)}


STEP_KINDS = ("text", "image", "video", "caption", "retrieval")


def step_pairs(quick: bool, sizes: list[str], device_type: str = "cpu", rounds: int | None = None,
               compile: bool = False, kinds: list[str] | None = None) -> list[StepPair]:
    """Text against BertModel and images against timm ViT for every size; video and captioning (full
    runs only) have no established baseline. A full run repeats every pair in 3 rounds (ABBA order);
    --quick runs one round, with one more timed step per case instead, to stay within a few minutes.
    `compile` compiles both sides of every pair (ours: the encoder, as `train.compile` does); `kinds`
    keeps only those step kinds (e.g. image and retrieval)."""
    unknown = sorted(set(kinds or ()) - set(STEP_KINDS))
    if unknown:
        raise UpctlError(f"unknown step kind(s) {unknown}; choose among {', '.join(STEP_KINDS)}")
    shapes = dict(GPU_SHAPES if device_type == "cuda" else CPU_SHAPES)
    if quick and device_type != "cuda":
        shapes.update(QUICK_CPU_SHAPES)
    n_rounds = rounds if rounds is not None else (1 if quick else 3)
    if n_rounds < 1:
        raise UpctlError(f"--rounds {n_rounds}: expected 1 or more")
    extra = {"compile": True} if compile else {}
    pairs: list[StepPair] = []
    for size in sizes:
        b_text, t_len = shapes["text"]
        text = dict(size=size, kind="text", batch=b_text, text_len=t_len, **extra)
        image = dict(size=size, kind="image", batch=shapes["image"], frames=1, **extra)
        pairs += [
            StepPair({"impl": "ours", **text}, {"impl": "bert", **text}, n_rounds),
            StepPair({"impl": "ours", **image}, {"impl": "timm-vit", **image}, n_rounds),
        ]
        if not quick:
            (b_vid, frames), (b_cap, cap_len), (b_pair, pair_len) = shapes["video"], shapes["caption"], shapes["retrieval"]
            pairs += [
                StepPair(dict(impl="ours", size=size, kind="video", batch=b_vid, frames=frames, **extra), None, n_rounds),
                StepPair(dict(impl="ours", size=size, kind="caption", batch=b_cap, frames=1, text_len=cap_len, **extra),
                         None, n_rounds),
                # Image-text pairs/s, the figure open_clip publishes (no in-process baseline).
                StepPair(dict(impl="ours", size=size, kind="retrieval", batch=b_pair, frames=1, text_len=pair_len, **extra),
                         None, n_rounds),
            ]
    return [p for p in pairs if not kinds or p.ours["kind"] in kinds]


def round_order(pair: StepPair) -> list[tuple[int, dict[str, Any]]]:
    """(round, spec) in the order to run them: ours/theirs, then theirs/ours, alternately (ABBA), so
    that a machine slowly getting busier or quieter does not favour one side of the ratio."""
    order: list[tuple[int, dict[str, Any]]] = []
    for r in range(pair.rounds):
        specs = [pair.ours] + ([pair.theirs] if pair.theirs else [])
        order += [(r, spec) for spec in (specs if r % 2 == 0 else specs[::-1])]
    return order


def median_ratio(ours_s: list[float], theirs_s: list[float]) -> float:
    """Throughput of ours over theirs: the median over rounds of theirs_time / ours_time, each round's
    two numbers taken back to back."""
    if len(ours_s) != len(theirs_s) or not ours_s:
        raise ValueError(f"need one time per round on each side, got {len(ours_s)} and {len(theirs_s)}")
    return statistics.median(t / o for o, t in zip(ours_s, theirs_s))


def run_training_steps(report: BenchReport, device: torch.device, quick: bool, sizes: list[str],
                       peak: float, progress: Progress | None = None, rounds: int | None = None,
                       compile: bool = False, kinds: list[str] | None = None) -> None:
    pairs = step_pairs(quick, sizes, device.type, rounds, compile, kinds)
    # A GPU step takes milliseconds: more repeats cost little and steady the median; its warm-up also
    # covers the cuBLAS / cuDNN heuristics. A compiled case compiles in its first forward and backward.
    repeats = 10 if device.type == "cuda" else (2 if quick else 3)
    warmup = 3 if device.type == "cuda" else (2 if compile else 1)
    total = sum(len(round_order(p)) for p in pairs)
    done = 0
    for pair in pairs:
        runs: dict[str, list[dict]] = {"ours": [], "theirs": []}
        for _, spec in round_order(pair):
            if progress:
                progress(done, total, "training steps")
            # On a GPU every case (baselines too) runs under bf16 autocast, as training does there.
            precision = "bf16" if device.type == "cuda" else "fp32"
            res = run_case_in_subprocess({**spec, "device": str(device), "repeats": repeats, "warmup": warmup,
                                          "precision": precision})
            runs["ours" if spec is pair.ours else "theirs"].append(res)
            done += 1
        for side, spec in (("ours", pair.ours), ("theirs", pair.theirs)):
            if spec is not None:
                _add_step_row(report, spec, runs[side], peak)
        if pair.theirs is not None:
            ours_s, theirs_s = [r["median_s"] for r in runs["ours"]], [r["median_s"] for r in runs["theirs"]]
            spec = pair.ours
            report.add("ratio", f"ours/{pair.theirs['impl']} {spec['size']} {spec['kind']}"
                       + (" compiled" if spec.get("compile") else ""),
                       ratio=round(median_ratio(ours_s, theirs_s), 3), rounds=pair.rounds,
                       per_round=" ".join(f"{t / o:.3f}" for o, t in zip(ours_s, theirs_s)))
    if progress:
        progress(total, total, "training steps")


def _add_step_row(report: BenchReport, spec: dict[str, Any], results: list[dict], peak: float) -> None:
    """One row per case: the median over rounds of each round's median step time."""
    median_s = statistics.median(r["median_s"] for r in results)
    first = results[0]
    report.add(
        "train_step",
        f"{spec['impl']} {spec['size']} {spec['kind']}" + (" compiled" if spec.get("compile") else ""),
        batch=spec["batch"],
        median_s=round(median_s, 4),
        samples_per_s=round(spec["batch"] / median_s, 3),
        tokens_per_s=round(first["tokens_per_s"] * first["median_s"] / median_s, 1),
        gflops_per_s=round(first["flops_per_step"] / median_s / 1e9, 2),
        mfu=round(first["flops_per_step"] / median_s / peak, 3),
        peak_mem_mb=round(max(r["peak_mem_bytes"] for r in results) / 2**20, 1),
    )


def run_checkpointing_memory(report: BenchReport, device: torch.device, size: str, quick: bool) -> None:
    """Memory of the training step with and without activation checkpointing: the rise over one forward +
    backward (activations + gradients) and the whole process's peak (adding weights, optimizer state
    and the interpreter), plus the step-time cost of recomputing activations."""
    # Batch 32 x 128 tokens: at pre-training batch sizes (the reference uses 512 text sequences per
    # GPU) activations, which checkpointing drops, dominate the step's memory over the gradients.
    # --quick skips the timed step (repeats=0): the slowdown then compares the single measured
    # forward + backward passes.
    batch = 128 if device.type == "cuda" else (16 if quick else 32)
    spec = dict(impl="ours", size=size, kind="text", batch=batch, text_len=128,
                repeats=0 if quick else 1, warmup=0, device=str(device), measure_memory=True,
                precision="bf16" if device.type == "cuda" else "fp32")
    # A fixed mmap threshold makes glibc return every freed block over 128 KiB to the system, so the
    # resident high-water mark follows the live tensors. With its default adaptive threshold, freed
    # activation blocks stay in the heap and checkpointing's recomputation shows up as
    # fragmentation, not as tensors (measured: 1.22 GB with, 0.50 GB without, same step).
    env = {"MALLOC_MMAP_THRESHOLD_": "131072"} if device.type == "cpu" else None
    plain = run_case_in_subprocess({**spec, "checkpointing": False}, env=env)
    ckpt = run_case_in_subprocess({**spec, "checkpointing": True}, env=env)
    mb = 2**20
    report.add("memory", f"activation checkpointing {size}, batch {spec['batch']} x 128 tokens",
               fwd_bwd_mem_mb_plain=round(plain["fwd_bwd_mem_bytes"] / mb, 1),
               fwd_bwd_mem_mb_ckpt=round(ckpt["fwd_bwd_mem_bytes"] / mb, 1),
               reduction=round(1 - ckpt["fwd_bwd_mem_bytes"] / max(plain["fwd_bwd_mem_bytes"], 1), 3),
               process_peak_mb_plain=round(plain["fwd_bwd_peak_bytes"] / mb, 1),
               process_peak_mb_ckpt=round(ckpt["fwd_bwd_peak_bytes"] / mb, 1),
               process_reduction=round(1 - ckpt["fwd_bwd_peak_bytes"] / max(plain["fwd_bwd_peak_bytes"], 1), 3),
               seconds_plain=round(plain["median_s"], 2),
               seconds_ckpt=round(ckpt["median_s"], 2),
               slowdown=round(ckpt["median_s"] / plain["median_s"], 3))


def run_suite(device: torch.device, quick: bool = True, sizes: list[str] | None = None,
              sections: list[str] | None = None, progress: Progress | None = None,
              rounds: int | None = None, compile: bool = False, kinds: list[str] | None = None) -> BenchReport:
    sizes = sizes or (["base"] if quick else ["tiny", "small", "base"])
    sections = sections or ["peak", "train", "memory", "decode", "loader", "eval", "scale"]
    report = BenchReport(machine_info(device))
    # The MFU denominator in the precision the steps run in: bf16 on a GPU, fp32 on a CPU.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak_flops(device, dtype, sizes=(2048, 4096, 8192) if device.type == "cuda" else (1024, 2048, 3072))
    report.add("peak", "matmul " + ("bf16" if dtype is torch.bfloat16 else "fp32"), gflops_per_s=round(peak / 1e9, 2))
    if "train" in sections:
        run_training_steps(report, device, quick, sizes, peak, progress, rounds, compile, kinds)
    if "memory" in sections:
        run_checkpointing_memory(report, device, "base", quick)
    extra = _optional_sections()
    for name in ("decode", "loader", "eval", "scale"):
        if name in sections and name in extra:
            extra[name](report, device, quick)
    return report


def _optional_sections() -> dict[str, Callable[[BenchReport, torch.device, bool], None]]:
    """Sections living in their own modules (decoding, loaders, evaluation, scaling)."""
    from uniperceiver.bench import sections

    return sections.SECTIONS
