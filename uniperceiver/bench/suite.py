"""The `upctl bench` suite: each case measured in a fresh process, ratios within one run.

Sections: matrix-multiply peak (the MFU denominator), training steps of ours vs BertModel / timm ViT,
activation-checkpointing memory, caption decoding with and without the key/value cache, loader
throughput (images, 8-frame video vs a bare PyAV decode), evaluation with and without the target
cache, and the growth of retrieval scoring and corpus streaming at 1x / 4x / 16x the work.

Training steps can also be measured lever by lever (`LEVERS`, `--levers`): our step compiled as
`train.compile` does, then the whole step compiled, CUDA graphs, bf16 optimizer state, the chunked
contrastive loss, each against the compiled baselines of the same run (a "lever" table). With
`jobs`, cases compile side by side in long-lived workers and are timed one at a time afterwards.
"""

from __future__ import annotations

import json
import platform
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from uniperceiver.bench.step_runs import (
    Runs,
    add_lever_rows,
    add_step_row,
    case_key,
    case_name,
    run_case_in_subprocess,
    run_sequentially,
    run_served,
    wait_for_file,
)
from uniperceiver.bench.timing import matmul_peak_flops
from uniperceiver.errors import UpctlError

from uniperceiver.utils.progress import Progress

Log = Callable[[str], None]


@dataclass(frozen=True)
class StepOptions:
    """How the training-step cases are chosen and run (`upctl bench` flags; `run_training_steps`).

    rounds: ABBA rounds per pair (default by device); compile: torch.compile on both sides; kinds:
    a subset of STEP_KINDS; levers: named levers (`parse_levers`) measured one by one; overrides:
    StepCase fields set on our step; baselines: also time BertModel / timm; jobs: N long-lived
    workers warm up side by side, then cases are timed one at a time (None: a fresh process per
    case and round); case_timeout: seconds per case; keep_going: a failing case becomes an error
    row; wait_for: a file the timed runs wait for (a GPU test run started beside the warm-ups).
    """

    rounds: int | None = None
    compile: bool = False
    kinds: list[str] | None = None
    levers: list[tuple[str, list[str] | None]] | None = None
    overrides: dict[str, Any] | None = None
    baselines: bool = True
    jobs: int | None = None
    case_timeout: float = 900.0
    keep_going: bool = False
    wait_for: str | None = None


@dataclass
class BenchReport:
    machine: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    sink: str | None = None  # a JSON-lines file every row is appended to as it is measured

    def add(self, section: str, name: str, **values: Any) -> None:
        """Add a row; with a sink, append it there at once (a run cut short keeps its finished rows)."""
        row = {"section": section, "name": name, **values}
        self.rows.append(row)
        if self.sink:
            with open(self.sink, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row, sort_keys=True) + "\n")

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




@dataclass
class StepPair:
    """Our step and, where one exists, the established implementation's step at the same shapes."""

    ours: dict[str, Any]
    theirs: dict[str, Any] | None
    rounds: int
    lever: str = ""  # the named lever (`LEVERS`) this pair measures, if it came from one


# Named levers (`--levers`): the StepCase fields each sets on our step. Every lever after "step"
# builds on "step" (the whole forward + loss compiled), so each such row differs from the "step"
# row by exactly one thing; "stacked" combines them. Only "eager" and "compiled" also run the
# baselines (BertModel, timm ViT) in their established setups: the ratios the targets name.
LEVERS: dict[str, dict[str, Any]] = {
    "eager": {},
    "compiled": {"compile": True},  # our encoder, as train.compile does
    "step": {"compile": True, "compile_scope": "step"},
    "autotune": {"compile": True, "compile_scope": "step", "compile_mode": "max-autotune-no-cudagraphs"},
    "graphs": {"compile": True, "compile_scope": "step", "cuda_graphs": True},
    "bf16-optim": {"compile": True, "compile_scope": "step", "optim_state": "bf16"},
    "chunked-loss": {"compile": True, "compile_scope": "step", "loss": "chunked"},  # image-text pairs only
    "stacked": {"compile": True, "compile_scope": "step", "cuda_graphs": True, "optim_state": "bf16",
                "loss": "chunked"},
    "eager-graphs": {"cuda_graphs": True},  # what launch overhead costs the eager step
}
BASELINE_LEVERS = ("eager", "compiled")
LEVER_FIELDS = ("compile", "compile_scope", "compile_mode", "cuda_graphs", "optim_state", "loss")


def parse_levers(text: str) -> list[tuple[str, list[str] | None]]:
    """`"step,graphs:image+retrieval"` -> [("step", None), ("graphs", ["image", "retrieval"])]: a lever
    name, optionally restricted to some step kinds (within those --kinds selects)."""
    out: list[tuple[str, list[str] | None]] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, _, kinds = item.partition(":")
        if name not in LEVERS:
            raise UpctlError(f"unknown lever {name!r}; choose among {', '.join(LEVERS)}")
        only = [k for k in kinds.split("+") if k] or None
        unknown = sorted(set(only or ()) - set(STEP_KINDS))
        if unknown:
            raise UpctlError(f"lever {name!r}: unknown step kind(s) {unknown}; choose among {', '.join(STEP_KINDS)}")
        out.append((name, only))
    return out




# Batch shapes per device: on a 2-core CPU a step of base must stay near seconds; on a GPU the batch
# must be large enough to keep the matrix units busy (about the reference's per-GPU batch sizes).
CPU_SHAPES = {"text": (8, 128), "image": 8, "video": (2, 4), "caption": (8, 30), "retrieval": (8, 30)}
QUICK_CPU_SHAPES = {"text": (4, 64), "image": 2}
GPU_SHAPES = {"text": (256, 128), "image": 128, "video": (16, 8), "caption": (128, 30), "retrieval": (256, 30)}


STEP_KINDS = ("text", "image", "video", "caption", "retrieval")


def step_pairs(quick: bool, sizes: list[str], device_type: str = "cpu", rounds: int | None = None,
               compile: bool = False, kinds: list[str] | None = None,
               levers: list[tuple[str, list[str] | None]] | None = None,
               overrides: dict[str, Any] | None = None, baselines: bool = True) -> list[StepPair]:
    """Text against BertModel and images against timm ViT for every size; video and captioning (full
    runs only) have no established baseline. A full run repeats every pair in 3 rounds (ABBA order);
    --quick runs one round, with one more timed step per case instead, to stay within a few minutes.
    `compile` compiles both sides of every pair (ours: the encoder, as `train.compile` does); `kinds`
    keeps only those step kinds (e.g. image and retrieval).

    `overrides`: StepCase lever fields (compile_scope, cuda_graphs, ...) for our side only; the
    baselines keep their established setup (eager, or compiled whole). `levers` (`parse_levers`)
    instead repeats the selection once per named lever; only "eager" and "compiled" bring the
    baselines along. `baselines=False` drops them everywhere. A chunked loss applies to the
    image-text pairs only: the "chunked-loss" lever skips the other kinds, others drop the field."""
    unknown = sorted(set(kinds or ()) - set(STEP_KINDS))
    if unknown:
        raise UpctlError(f"unknown step kind(s) {unknown}; choose among {', '.join(STEP_KINDS)}")
    shapes = dict(GPU_SHAPES if device_type == "cuda" else CPU_SHAPES)
    if quick and device_type != "cuda":
        shapes.update(QUICK_CPU_SHAPES)
    n_rounds = rounds if rounds is not None else (1 if quick else 3)
    if n_rounds < 1:
        raise UpctlError(f"--rounds {n_rounds}: expected 1 or more")
    if levers is not None and (compile or overrides):
        raise UpctlError("choose the levers either by name (--levers) or by flags (--compile, --compile-scope, ...), not both")
    base: list[tuple[dict[str, Any], str | None]] = []  # (shape spec, baseline implementation)
    for size in sizes:
        b_text, t_len = shapes["text"]
        base += [(dict(size=size, kind="text", batch=b_text, text_len=t_len), "bert"),
                 (dict(size=size, kind="image", batch=shapes["image"], frames=1), "timm-vit")]
        if not quick:
            (b_vid, frames), (b_cap, cap_len), (b_pair, pair_len) = shapes["video"], shapes["caption"], shapes["retrieval"]
            base += [(dict(size=size, kind="video", batch=b_vid, frames=frames), None),
                     (dict(size=size, kind="caption", batch=b_cap, frames=1, text_len=cap_len), None),
                     # Image-text pairs/s, the figure open_clip publishes (no in-process baseline).
                     (dict(size=size, kind="retrieval", batch=b_pair, frames=1, text_len=pair_len), None)]
    if levers is None:
        variants = [("", {"compile": True} if compile else {}, None, True)]
        variants[0][1].update(overrides or {})
    else:
        variants = [(name, dict(LEVERS[name]), only, name in BASELINE_LEVERS) for name, only in levers]
    pairs: list[StepPair] = []
    for lever, fields, only, with_baseline in variants:
        for shape, baseline in base:
            kind = shape["kind"]
            if (kinds and kind not in kinds) or (only and kind not in only):
                continue
            ours = dict(fields)
            if ours.get("loss", "plain") != "plain" and kind != "retrieval":
                if lever == "chunked-loss":
                    continue  # the same case as "step" for kinds without a contrastive loss
                del ours["loss"]
            theirs = None
            if baseline and baselines and with_baseline:
                theirs = {"impl": baseline, **shape, **({"compile": True} if fields.get("compile") else {})}
            pairs.append(StepPair({"impl": "ours", **shape, **ours}, theirs, n_rounds, lever))
    return pairs




def median_ratio(ours_s: list[float], theirs_s: list[float]) -> float:
    """Throughput of ours over theirs: the median over rounds of theirs_time / ours_time, each round's
    two numbers taken back to back."""
    if len(ours_s) != len(theirs_s) or not ours_s:
        raise ValueError(f"need one time per round on each side, got {len(ours_s)} and {len(theirs_s)}")
    return statistics.median(t / o for o, t in zip(ours_s, theirs_s))




def run_training_steps(report: BenchReport, device: torch.device, quick: bool, sizes: list[str],
                       peak: float | Callable[[], float], progress: Progress | None = None,
                       options: StepOptions | None = None, log: Log | None = None) -> None:
    """Time every pair of `step_pairs` and add a row per case, a ratio per pair with a baseline and,
    with `levers`, a lever table (each compiled case against our compiled encoder and the compiled baseline).

    `peak` may be a function: it is then called right before the first timed step (after the warm-ups
    and `wait_for`), so that the peak is measured on a quiet device. `jobs` (N >= 1): every case
    builds and warms up (compiles) in its own long-lived worker, N at a time, and only then are the
    cases timed, one at a time (`timing.ServedCase`): compilation overlaps, timings never do. Without
    it each (round, case) runs in a fresh process, one after another. `wait_for`: a file whose
    appearance the timed runs wait for (at most `case_timeout`), e.g. a GPU test run started beside
    the warm-ups. `keep_going`: a case that fails or times out becomes an "error" row instead of
    stopping the run.
    """
    o = options or StepOptions()
    rounds, compile, kinds, levers, overrides = o.rounds, o.compile, o.kinds, o.levers, o.overrides
    jobs, case_timeout, keep_going, wait_for = o.jobs, o.case_timeout, o.keep_going, o.wait_for
    pairs = step_pairs(quick, sizes, device.type, rounds, compile, kinds, levers, overrides, o.baselines)
    # A GPU step takes milliseconds: more repeats cost little and steady the median; its warm-up also
    # covers the cuBLAS / cuDNN heuristics. A compiled case compiles in its first forward and backward.
    repeats = 10 if device.type == "cuda" else (2 if quick else 3)
    any_compile = any(p.ours.get("compile") for p in pairs)
    warmup = 3 if device.type == "cuda" else (2 if any_compile else 1)
    # On a GPU every case (baselines too) runs under bf16 autocast, as training does there.
    precision = "bf16" if device.type == "cuda" else "fp32"

    def full(spec: dict[str, Any]) -> dict[str, Any]:
        return {**spec, "device": str(device), "repeats": repeats, "warmup": warmup, "precision": precision}

    def before_timing() -> float:
        if wait_for:
            wait_for_file(wait_for, case_timeout, log)
        return peak() if callable(peak) else peak

    errors: dict[str, str] = {}
    peak_value: list[float] = []

    def timing_starts() -> None:
        peak_value.append(before_timing())

    def pair_done(pair: StepPair, run: Runs) -> None:
        """Rows as soon as a pair is timed (a sink keeps them if the run is cut short later)."""
        for side, spec in (("ours", pair.ours), ("theirs", pair.theirs)):
            if spec is None:
                continue
            if case_key(spec) in errors:
                report.add("error", case_name(spec), lever=pair.lever, error=errors[case_key(spec)])
            else:
                add_step_row(report, spec, run[side], peak_value[0], pair.lever)
        if pair.theirs is not None and not ({case_key(pair.ours), case_key(pair.theirs)} & errors.keys()):
            ours_s, theirs_s = [r["median_s"] for r in run["ours"]], [r["median_s"] for r in run["theirs"]]
            report.add("ratio", f"ours/{pair.theirs['impl']} " + case_name(pair.ours).split(" ", 1)[1],
                       ratio=round(median_ratio(ours_s, theirs_s), 3), rounds=pair.rounds,
                       per_round=" ".join(f"{t / o:.3f}" for o, t in zip(ours_s, theirs_s)))

    if jobs:
        run_served(pairs, full, jobs, case_timeout, keep_going, errors, timing_starts, pair_done, progress, log)
    else:
        run_sequentially(pairs, full, case_timeout, keep_going, errors, timing_starts, pair_done, progress, log)
    if levers is not None:
        add_lever_rows(report)


















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
              steps: StepOptions | None = None, sink: str | None = None, log: Log | None = None) -> BenchReport:
    """The sections asked for, in order; the training-step options are `run_training_steps`'s."""
    steps = steps or StepOptions()
    sizes = sizes or (["base"] if quick else ["tiny", "small", "base"])
    sections = sections or ["peak", "train", "memory", "decode", "loader", "eval", "scale"]
    report = BenchReport(machine_info(device), sink=sink)
    # The MFU denominator in the precision the steps run in: bf16 on a GPU, fp32 on a CPU.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    measured: list[float] = []

    def peak() -> float:
        """Measured once, when first needed; its row leads the report whenever it is measured."""
        if not measured:
            sizes_ = (2048, 4096, 8192) if device.type == "cuda" else (1024, 2048, 3072)
            measured.append(matmul_peak_flops(device, dtype, sizes=sizes_))
            report.add("peak", "matmul " + ("bf16" if dtype is torch.bfloat16 else "fp32"),
                       gflops_per_s=round(measured[0] / 1e9, 2))
            report.rows.insert(0, report.rows.pop())
        return measured[0]

    if "train" in sections:
        # With parallel warm-ups the peak waits for them (and for `wait_for`): a busy device reads low.
        run_training_steps(report, device, quick, sizes, peak if steps.jobs else peak(), progress, steps, log)
    peak()
    if "memory" in sections:
        run_checkpointing_memory(report, device, "base", quick)
    extra = _optional_sections()
    known = ["decode", "loader", "eval", "scale"]  # their historical order, then any section registered later
    for name, section in sorted(extra.items(), key=lambda kv: known.index(kv[0]) if kv[0] in known else len(known)):
        if name == "checkpoint" and name in sections:  # per model size (--sizes), old writer vs new
            section(report, device, quick, sizes)
        elif name in sections:
            section(report, device, quick)
    return report


def _optional_sections() -> dict[str, Callable[[BenchReport, torch.device, bool], None]]:
    """Sections living in their own modules (decoding, loaders, evaluation, scaling)."""
    from uniperceiver.bench import sections

    return sections.SECTIONS
