"""How the training-step cases of `upctl bench` are run: each (round, case) in a fresh process one
after another, or (`jobs`) every case warmed up in its own long-lived worker, N side by side, and
then timed one at a time, so compilation overlaps and timings never do; and the rows they add.

Kept apart from suite.py, which says WHAT is measured (cases, levers, sections), because the
running is what differs between a CPU run and a GPU run with parallel compilation.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable

from uniperceiver.bench.timing import ServedCase, run_for_result
from uniperceiver.errors import UpctlError
from uniperceiver.utils.progress import Progress

if TYPE_CHECKING:
    from uniperceiver.bench.suite import BenchReport, StepPair

Log = Callable[[str], None]


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

def run_case_in_subprocess(spec: dict[str, Any], timeout: float = 900,
                           env: dict[str, str] | None = None) -> dict[str, Any]:
    """One training-step case in a fresh interpreter (extra environment variables in `env`)."""
    cmd = [sys.executable, "-m", "uniperceiver.bench.worker", json.dumps(spec)]
    try:
        return run_for_result(cmd, timeout, env)
    except RuntimeError as exc:
        raise UpctlError(f"benchmark case {spec} failed: {exc}") from None

def round_order(pair: StepPair) -> list[tuple[int, dict[str, Any]]]:
    """(round, spec) in the order to run them: ours/theirs, then theirs/ours, alternately (ABBA), so
    that a machine slowly getting busier or quieter does not favour one side of the ratio."""
    order: list[tuple[int, dict[str, Any]]] = []
    for r in range(pair.rounds):
        specs = [pair.ours] + ([pair.theirs] if pair.theirs else [])
        order += [(r, spec) for spec in (specs if r % 2 == 0 else specs[::-1])]
    return order

Runs = dict[str, list[dict[str, Any]]]  # "ours" / "theirs" -> one result per round

def case_key(spec: dict[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True)

def wait_for_file(path: str, timeout: float, log: Log | None) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            if log:
                log(f"{path} did not appear within {timeout:.0f} s; timing anyway")
            return
        time.sleep(1.0)

def run_sequentially(pairs: list[StepPair], full: Callable[[dict], dict], case_timeout: float, keep_going: bool,
                     errors: dict[str, str], timing_starts: Callable[[], None],
                     pair_done: Callable[[StepPair, Runs], None], progress: Progress | None, log: Log | None) -> None:
    """Each (round, case) in a fresh process, one after another (a process's memory figures its own)."""
    timing_starts()
    total = sum(len(round_order(p)) for p in pairs)
    done = 0
    for pair in pairs:
        run: Runs = {"ours": [], "theirs": []}
        for _, spec in round_order(pair):
            if progress:
                progress(done, total, "training steps")
            done += 1
            if case_key(spec) in errors:
                continue
            try:
                res = run_case_in_subprocess(full(spec), timeout=case_timeout)
            except UpctlError as exc:
                if not keep_going:
                    raise
                errors[case_key(spec)] = str(exc)
                if log:
                    log(f"{case_name(spec)}: {exc}")
                continue
            if log:
                log(f"{case_name(spec)}: {res['median_s']:.4f} s/step")
            run["ours" if spec is pair.ours else "theirs"].append(res)
        pair_done(pair, run)
    if progress:
        progress(total, total, "training steps")

def _graph_group(spec: dict[str, Any]) -> str:
    """Cases that compile the same model graph (they differ only in CUDA graphs or optimizer state)."""
    return case_key({k: v for k, v in spec.items() if k not in ("cuda_graphs", "optim_state")})

def _warm_cost(spec: dict[str, Any]) -> float:
    """A rough relative compile time, to start the longest warm-ups first."""
    cost = 1.0 if spec.get("compile") else 0.1
    cost *= 2.0 if spec["kind"] == "retrieval" else 1.0  # two sequence shapes (two graphs with the encoder alone)
    cost *= 4.0 if "autotune" in spec.get("compile_mode", "") else 1.0
    return cost + (0.5 if spec.get("optim_state", "fp32") != "fp32" else 0.0)

def run_served(pairs: list[StepPair], full: Callable[[dict], dict], jobs: int, case_timeout: float,
                 keep_going: bool, errors: dict[str, str], timing_starts: Callable[[], None],
                 pair_done: Callable[[StepPair, Runs], None], progress: Progress | None, log: Log | None) -> None:
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
                specs.setdefault(case_key(spec), spec)
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
            errors[case_key(spec)] = f"warm-up {exc}"
            if log:
                log(f"{case_name(spec)}: warm-up failed ({exc}); its last lines:\n{tail}")
        else:
            workers[case_key(spec)] = worker
            if log:
                log(f"{case_name(spec)}: warmed up in {info['warmup_s']:.1f} s")
        done[0] += 1
        if progress:
            progress(done[0], total, "training steps")

    def warm(group: list[dict[str, Any]]) -> None:
        for spec in sorted(group, key=lambda s: (bool(s.get("cuda_graphs")), s.get("optim_state", "fp32") != "fp32")):
            warm_one(spec, last_try=False)

    last_use = {case_key(spec): i for i, pair in enumerate(pairs) for spec in (pair.ours, pair.theirs) if spec is not None}
    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(warm, ordered))
        for spec in retry:  # alone now: the other warm-ups are done and hold no activations
            warm_one(spec, last_try=True)
        if errors and not keep_going:
            raise UpctlError("benchmark case(s) failed: " + "; ".join(
                f"{case_name(json.loads(k))}: {msg}" for k, msg in errors.items()))
        timing_starts()
        for i, pair in enumerate(pairs):
            run: Runs = {"ours": [], "theirs": []}
            for _, spec in round_order(pair):
                key = case_key(spec)
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
            pair_done(pair, run)
            for key in [k for k, last in last_use.items() if last == i and k in workers]:
                workers.pop(key).close()
    finally:
        for worker in workers.values():
            worker.close()

def add_step_row(report: BenchReport, spec: dict[str, Any], results: list[dict], peak: float, lever: str = "") -> None:
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
    if any(r.get("peak_reserved_bytes") for r in results):
        values["peak_reserved_mb"] = round(max(r["peak_reserved_bytes"] for r in results) / 2**20, 1)
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

def add_lever_rows(report: BenchReport) -> None:
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
