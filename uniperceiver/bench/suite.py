"""The `upctl bench` suite: each case measured in a fresh process, ratios within one run.

Sections: matrix-multiply peak (the MFU denominator), training steps of ours vs BertModel / timm ViT,
activation-checkpointing memory, caption decoding with and without the key/value cache, loader
throughput (images, 8-frame video vs a bare PyAV decode), evaluation with and without the target
cache, and the growth of retrieval scoring and corpus streaming at 1x / 4x / 16x the work.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from uniperceiver.bench.timing import ServedCase, matmul_peak_flops, run_for_result
from uniperceiver.errors import UpctlError

Progress = Callable[[int, int | None, str], None]
Log = Callable[[str], None]


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


def case_name(spec: dict[str, Any]) -> str:
    """`ours base image`, then one tag per lever in effect: `compiled` (the encoder, as train.compile)
    or `compiled-step`, the compile mode if not the default, `cuda-graphs`, `bf16-optim`, `chunked-loss`."""
    tags = [spec["impl"], spec["size"], spec["kind"]]
    if spec.get("compile"):
        tags.append("compiled" if spec.get("compile_scope", "encoder") == "encoder" else "compiled-step")
    if spec.get("compile_mode", "default") != "default":
        tags.append(spec["compile_mode"])
    if spec.get("cuda_graphs"):
        tags.append("cuda-graphs")
    if spec.get("optim_state", "fp32") != "fp32":
        tags.append(f"{spec['optim_state']}-optim")
    if spec.get("loss", "plain") != "plain":
        tags.append(f"{spec['loss']}-loss")
    return " ".join(tags)


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


Runs = dict[str, list[dict[str, Any]]]  # "ours" / "theirs" -> one result per round


def run_training_steps(report: BenchReport, device: torch.device, quick: bool, sizes: list[str],
                       peak: float | Callable[[], float], progress: Progress | None = None,
                       rounds: int | None = None, compile: bool = False, kinds: list[str] | None = None, *,
                       levers: list[tuple[str, list[str] | None]] | None = None,
                       overrides: dict[str, Any] | None = None, baselines: bool = True, jobs: int | None = None,
                       case_timeout: float = 900.0, keep_going: bool = False, wait_for: str | None = None,
                       log: Log | None = None) -> None:
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
    pairs = step_pairs(quick, sizes, device.type, rounds, compile, kinds, levers, overrides, baselines)
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
            _wait_for_file(wait_for, case_timeout, log)
        return peak() if callable(peak) else peak

    errors: dict[str, str] = {}
    if jobs:
        runs, peak_value = _served_runs(pairs, full, jobs, case_timeout, keep_going, errors, before_timing,
                                        progress, log)
    else:
        runs, peak_value = _sequential_runs(pairs, full, case_timeout, keep_going, errors, before_timing,
                                            progress, log)
    for pair, run in zip(pairs, runs):
        for side, spec in (("ours", pair.ours), ("theirs", pair.theirs)):
            if spec is None:
                continue
            if _key(spec) in errors:
                report.add("error", case_name(spec), lever=pair.lever, error=errors[_key(spec)])
            else:
                _add_step_row(report, spec, run[side], peak_value, pair.lever)
        if pair.theirs is not None and not ({_key(pair.ours), _key(pair.theirs)} & errors.keys()):
            ours_s, theirs_s = [r["median_s"] for r in run["ours"]], [r["median_s"] for r in run["theirs"]]
            report.add("ratio", f"ours/{pair.theirs['impl']} " + case_name(pair.ours).split(" ", 1)[1],
                       ratio=round(median_ratio(ours_s, theirs_s), 3), rounds=pair.rounds,
                       per_round=" ".join(f"{t / o:.3f}" for o, t in zip(ours_s, theirs_s)))
    if levers is not None:
        _add_lever_rows(report)


def _key(spec: dict[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True)


def _wait_for_file(path: str, timeout: float, log: Log | None) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            if log:
                log(f"{path} did not appear within {timeout:.0f} s; timing anyway")
            return
        time.sleep(1.0)


def _sequential_runs(pairs: list[StepPair], full: Callable[[dict], dict], case_timeout: float, keep_going: bool,
                     errors: dict[str, str], before_timing: Callable[[], float], progress: Progress | None,
                     log: Log | None) -> tuple[list[Runs], float]:
    """Each (round, case) in a fresh process, one after another (a process's memory figures its own)."""
    peak = before_timing()
    runs: list[Runs] = []
    total = sum(len(round_order(p)) for p in pairs)
    done = 0
    for pair in pairs:
        run: Runs = {"ours": [], "theirs": []}
        for _, spec in round_order(pair):
            if progress:
                progress(done, total, "training steps")
            done += 1
            if _key(spec) in errors:
                continue
            try:
                res = run_case_in_subprocess(full(spec), timeout=case_timeout)
            except UpctlError as exc:
                if not keep_going:
                    raise
                errors[_key(spec)] = str(exc)
                if log:
                    log(f"{case_name(spec)}: {exc}")
                continue
            if log:
                log(f"{case_name(spec)}: {res['median_s']:.4f} s/step")
            run["ours" if spec is pair.ours else "theirs"].append(res)
        runs.append(run)
    if progress:
        progress(total, total, "training steps")
    return runs, peak


def _graph_group(spec: dict[str, Any]) -> str:
    """Cases that compile the same model graph (they differ only in CUDA graphs or optimizer state)."""
    return _key({k: v for k, v in spec.items() if k not in ("cuda_graphs", "optim_state")})


def _warm_cost(spec: dict[str, Any]) -> float:
    """A rough relative compile time, to start the longest warm-ups first."""
    cost = 1.0 if spec.get("compile") else 0.1
    cost *= 2.0 if spec["kind"] == "retrieval" else 1.0  # two sequence shapes (two graphs with the encoder alone)
    cost *= 4.0 if "autotune" in spec.get("compile_mode", "") else 1.0
    return cost + (0.5 if spec.get("optim_state", "fp32") != "fp32" else 0.0)


def _served_runs(pairs: list[StepPair], full: Callable[[dict], dict], jobs: int, case_timeout: float,
                 keep_going: bool, errors: dict[str, str], before_timing: Callable[[], float],
                 progress: Progress | None, log: Log | None) -> tuple[list[Runs], float]:
    """Warm every distinct case up in a long-lived worker, `jobs` at a time, then time them one by one.

    Cases that compile the same graph warm up one after another in one slot, the later ones finding
    it in torch.compile's on-disk caches instead of compiling it again. A warm worker hands its
    cached device memory back while it waits, so that the others can compile beside it; a warm-up
    that runs out of device memory anyway is tried again at the end, alone. A worker is closed as
    soon as its last timed run is done (a CUDA-graph case holds a whole step's activations).
    """
    if jobs < 1:
        raise UpctlError(f"--jobs {jobs}: expected 1 or more")
    specs: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        for spec in (pair.ours, pair.theirs):
            if spec is not None:
                specs.setdefault(_key(spec), spec)
    groups: dict[str, list[dict[str, Any]]] = {}
    for spec in specs.values():
        groups.setdefault(_graph_group(spec), []).append(spec)
    ordered = sorted(groups.values(), key=lambda g: -sum(_warm_cost(s) for s in g))
    workers: dict[str, ServedCase] = {}
    total = len(specs) + sum(len(round_order(p)) for p in pairs)
    done = [0]

    retry: list[dict[str, Any]] = []

    def warm_one(spec: dict[str, Any], last_try: bool) -> None:
        worker = ServedCase([sys.executable, "-m", "uniperceiver.bench.worker", "--serve", json.dumps(full(spec))])
        try:
            info = worker.expect("READY", case_timeout)
        except RuntimeError as exc:
            tail = worker.stderr_tail()
            worker.close()
            if not last_try and "out of memory" in tail.lower():
                retry.append(spec)
                if log:
                    log(f"{case_name(spec)}: out of device memory while warming up beside others; tried again at the end")
                return
            errors[_key(spec)] = f"warm-up {exc}"
            if log:
                log(f"{case_name(spec)}: warm-up failed ({exc}); its last lines:\n{tail}")
        else:
            workers[_key(spec)] = worker
            if log:
                log(f"{case_name(spec)}: warmed up in {info['warmup_s']:.1f} s")
        done[0] += 1
        if progress:
            progress(done[0], total, "training steps")

    def warm(group: list[dict[str, Any]]) -> None:
        for spec in sorted(group, key=lambda s: (bool(s.get("cuda_graphs")), s.get("optim_state", "fp32") != "fp32")):
            warm_one(spec, last_try=False)

    last_use = {_key(spec): i for i, pair in enumerate(pairs) for spec in (pair.ours, pair.theirs) if spec is not None}
    runs: list[Runs] = []
    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(warm, ordered))
        for spec in retry:  # alone now: the other warm-ups are done and hold no activations
            warm_one(spec, last_try=True)
        if errors and not keep_going:
            raise UpctlError("benchmark case(s) failed: " + "; ".join(
                f"{case_name(json.loads(k))}: {msg}" for k, msg in errors.items()))
        peak = before_timing()
        for i, pair in enumerate(pairs):
            run: Runs = {"ours": [], "theirs": []}
            for _, spec in round_order(pair):
                key = _key(spec)
                if key in workers and key not in errors:
                    worker = workers[key]
                    try:
                        worker.send("time")
                        res = worker.expect("RESULT", case_timeout)
                    except (OSError, RuntimeError) as exc:
                        errors[key] = f"timed run {exc}"
                        if log:
                            log(f"{case_name(spec)}: timed run failed ({exc}); its last lines:\n{worker.stderr_tail()}")
                        if not keep_going:
                            raise UpctlError(f"benchmark case {case_name(spec)} failed: {exc}") from None
                    else:
                        run["ours" if spec is pair.ours else "theirs"].append(res)
                        if log:
                            log(f"{case_name(spec)}: {res['median_s']:.4f} s/step")
                done[0] += 1
                if progress:
                    progress(done[0], total, "training steps")
            runs.append(run)
            for key in [k for k, last in last_use.items() if last == i and k in workers]:
                workers.pop(key).close()
    finally:
        for worker in workers.values():
            worker.close()
    return runs, peak


def _add_step_row(report: BenchReport, spec: dict[str, Any], results: list[dict], peak: float, lever: str = "") -> None:
    """One row per case: the median over rounds of each round's median step time. On CUDA also the
    step issued back to back (`pipelined_*`) and the host syncs in one step; warm-up seconds (which
    hold the compilation) for every case."""
    median_s = statistics.median(r["median_s"] for r in results)
    first = results[0]
    values: dict[str, Any] = dict(
        batch=spec["batch"],
        median_s=round(median_s, 4),
        samples_per_s=round(spec["batch"] / median_s, 3),
        tokens_per_s=round(first["tokens_per_s"] * first["median_s"] / median_s, 1),
        gflops_per_s=round(first["flops_per_step"] / median_s / 1e9, 2),
        mfu=round(first["flops_per_step"] / median_s / peak, 3),
        peak_mem_mb=round(max(r["peak_mem_bytes"] for r in results) / 2**20, 1),
    )
    pipelined = [r["pipelined_s"] for r in results if r.get("pipelined_s")]
    if pipelined:
        p_s = statistics.median(pipelined)
        values.update(pipelined_s=round(p_s, 4), pipelined_samples_per_s=round(spec["batch"] / p_s, 3),
                      pipelined_mfu=round(first["flops_per_step"] / p_s / peak, 3))
    if first.get("host_syncs", -1) >= 0:
        values["host_syncs"] = max(r["host_syncs"] for r in results)
    if "warmup_s" in first:
        values["warmup_s"] = round(first["warmup_s"], 1)
    if spec.get("compile") and "graph_breaks" in first:
        values["graph_breaks"] = first["graph_breaks"]
    if lever:
        values["lever"] = lever
    report.add("train_step", case_name(spec), **values)


def _add_lever_rows(report: BenchReport) -> None:
    """The lever table: each of our compiled cases against our compiled encoder (`train.compile`,
    the figure a lever must beat) and against the compiled baseline of its kind, from this run."""
    rows = [r for r in report.rows if r["section"] == "train_step"]
    by_name = {r["name"]: r for r in rows}
    for row in rows:
        impl, size, kind, *tags = row["name"].split(" ")
        if impl != "ours":
            continue
        values: dict[str, Any] = {"lever": row.get("lever", ""), "samples_per_s": row["samples_per_s"],
                                  "mfu": row["mfu"]}
        if "pipelined_mfu" in row:
            values.update(pipelined_samples_per_s=row["pipelined_samples_per_s"], pipelined_mfu=row["pipelined_mfu"])
        compiled = by_name.get(f"ours {size} {kind} compiled")
        if compiled:
            values["speedup_vs_compiled"] = round(compiled["median_s"] / row["median_s"], 3)
        baseline = by_name.get(f"{'bert' if kind == 'text' else 'timm-vit'} {size} {kind} compiled")
        if baseline and kind in ("text", "image"):
            values["vs_baseline_compiled"] = round(baseline["median_s"] / row["median_s"], 3)
        report.add("lever", row["name"], **values)


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
              rounds: int | None = None, compile: bool = False, kinds: list[str] | None = None, *,
              levers: list[tuple[str, list[str] | None]] | None = None, overrides: dict[str, Any] | None = None,
              baselines: bool = True, jobs: int | None = None, case_timeout: float = 900.0,
              keep_going: bool = False, wait_for: str | None = None, sink: str | None = None,
              log: Log | None = None) -> BenchReport:
    """The sections asked for, in order; the training-step options are `run_training_steps`'s."""
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
        run_training_steps(report, device, quick, sizes, peak if jobs else peak(), progress, rounds, compile, kinds,
                           levers=levers, overrides=overrides, baselines=baselines, jobs=jobs,
                           case_timeout=case_timeout, keep_going=keep_going, wait_for=wait_for, log=log)
    peak()
    if "memory" in sections:
        run_checkpointing_memory(report, device, "base", quick)
    extra = _optional_sections()
    for name, section in extra.items():  # decode, loader, eval, scale and any section registered there
        if name == "checkpoint" and name in sections:  # per model size (--sizes), old writer vs new
            section(report, device, quick, sizes)
        elif name in sections:
            section(report, device, quick)
    return report


def _optional_sections() -> dict[str, Callable[[BenchReport, torch.device, bool], None]]:
    """Sections living in their own modules (decoding, loaders, evaluation, scaling)."""
    from uniperceiver.bench import sections

    return sections.SECTIONS
