"""`upctl demo`: the mini benchmark end to end (prepare, pre-train, zero-shot, prompt-tune, fine-tune, table).

The heavy lifting is in `upctl.demo` (stages as real `upctl` subprocesses) and `upctl.demo_report`
(results from the commands' JSON records); this module shows one line and a progress bar per
stage and prints the final table.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from upctl.common import console, err_console, fail_on_error
from upctl.demo_report import CHECK_SHORT, CHECKS, fmt, goal_lines


def _print_table(results: dict) -> None:
    """The results as a rich table narrow enough for an 80-column terminal (results.md has every detail)."""
    n = len(results["demo"]["seeds"])
    table = Table(title=f"held-out tasks, percent ({'mean±std over ' + str(n) + ' seeds' if n > 1 else '1 seed'}; "
                        "metrics in results.md)", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("task", "chance", "baseline", "zero-shot", "prompt", "fine-tune"):
        table.add_column(name, justify="left" if name == "task" else "right", no_wrap=True)
    for task in results["tasks"]:
        r = task["regimes"]
        cells = [fmt(r[k]["mean"], r[k]["std"], n).replace(" ± ", "±") for k in ("zeroshot", "prompt", "finetune")]
        table.add_row(task["task"], f"{task['chance']:.1f}", f"{task['baseline']['value']:.1f}", *cells)
    console.print(table)
    shares = ", ".join(f"{t['task']} {'/'.join(map(str, sorted(set(t['regimes']['prompt']['train_samples']))))}"
                       for t in results["tasks"])
    console.print(f"prompt tuning trained on (samples): {shares}", highlight=False)
    console.print("checks: zs>chance = zero-shot above chance beyond its spread, ft>=base-5 = fine-tuning at most "
                  "5 points under the baseline", highlight=False)
    width = max(len(t["task"]) for t in results["tasks"])
    for task in results["tasks"]:
        marks = "  ".join(f"{'✓' if task['checks'].get(name) else '✗'} {CHECK_SHORT[name]}" for name in CHECKS)
        console.print(f"  {task['task']:<{width}}  {marks}", highlight=False)
    for line in goal_lines(results):
        console.print(f"  {line}", highlight=False)


def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Output folder: results.md/.json/.png, json/, logs/, runs/ (replaced on each run)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Prepared data (default $UPCTL_DATA, else ./data)."),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="Seeds 0..N-1 (default 3; 1 with --quick)."),
    quick: bool = typer.Option(False, "--quick", help="A smoke run: 1 seed, a few steps per stage (numbers not meaningful)."),
    jobs: Optional[int] = typer.Option(None, "--jobs", help="Commands run side by side, one thread each (default: cores, 2..4)."),
    pretrain_steps: Optional[int] = typer.Option(None, "--pretrain-steps", help="Override the pre-training recipe's steps."),
    prompt_steps: Optional[int] = typer.Option(None, "--prompt-steps", help="Override the prompt-tuning steps."),
    finetune_steps: Optional[int] = typer.Option(None, "--finetune-steps", help="Override the fine-tuning steps."),
    keep_checkpoints: bool = typer.Option(False, "--keep-checkpoints", help="Keep resumable checkpoints (about 130 MB per run)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N for every command (default: CUDA when available)."),
) -> None:
    """Run the mini benchmark: the paper's three regimes on held-out tasks, in minutes on a CPU.

    Every stage is a real upctl command (logs in OUT/logs): prepare mini, then pretrain recipes/mini/pretrain.yaml once per seed, then zeroshot, prompt-tune + evaluate and finetune + evaluate on the held-out tasks mini-digits, mini-faces, mini-video-retrieval and mini-sentiment.

    The table is built from the commands' --json records and written to OUT/results.md, results.json and results.png (docs/DEMO.md explains it).

    Examples:

      upctl demo

      upctl demo --quick --out /tmp/demo-smoke

      upctl demo --seeds 5 --jobs 2 --out demo-5seeds
    """
    with fail_on_error():
        from dataclasses import replace

        from uniperceiver.data.format import resolve_data_dir
        from upctl.demo import DemoError, Layout, Runner, build_stages, clean_outputs, default_jobs, default_plan, prune_checkpoints
        from upctl.demo_report import collect, write_results

        plan = default_plan(quick=quick, seeds=seeds)
        for name, value in (("--pretrain-steps", pretrain_steps), ("--prompt-steps", prompt_steps),
                            ("--finetune-steps", finetune_steps), ("--jobs", jobs)):
            if value is not None and value < 1:
                raise DemoError(f"{name} must be at least 1, got {value}")
        plan = replace(plan, pretrain_steps=pretrain_steps or plan.pretrain_steps,
                       prompt_steps=prompt_steps or plan.prompt_steps, finetune_steps=finetune_steps or plan.finetune_steps)
        lay = Layout(out=out.expanduser().absolute(), data_dir=resolve_data_dir(data_dir))
        clean_outputs(lay)
        n_jobs = jobs or default_jobs()
        stages = build_stages(plan, lay, device)
        began = time.perf_counter()
        started = time.time()
        live = console.is_terminal
        console.print(f"[bold]mini benchmark[/]: {len(plan.seeds)} seed(s), {n_jobs} command(s) at a time, "
                      f"output {lay.out}, data {lay.data_dir}", highlight=False)
        for i, stage in enumerate(stages, 1):
            console.print(f"[bold][{i}/{len(stages)}][/] {stage.description}", highlight=False)
            total = sum(j.units for j in stage.jobs)
            columns = (TextColumn("   "), BarColumn(), TaskProgressColumn(), TextColumn("{task.description}"),
                       TimeElapsedColumn())
            with Progress(*columns, console=console, disable=not live, transient=False) as bar:
                tid = bar.add_task("", total=total)

                def update(stage=stage, bar=bar, tid=tid) -> None:
                    done = sum(1 for j in stage.jobs if j.done_units >= j.units)
                    bar.update(tid, completed=sum(j.done_units for j in stage.jobs),
                               description=f"{done}/{len(stage.jobs)} commands")

                def finished(job, stage=stage) -> None:
                    prune_checkpoints(job, keep_checkpoints)
                    if not live:
                        console.print(f"    done {job.name} ({job.seconds:.0f} s)", highlight=False)

                Runner(n_jobs, threads=1, on_update=update, on_done=finished).run(stage)
            console.print(f"    {len(stage.jobs)} command(s) in {stage.seconds:.0f} s", highlight=False)
        total_s = time.perf_counter() - began
        pt_steps = plan.pretrain_steps or stages[1].jobs[0].units
        results = collect(plan, lay, stages, started, total_s, pt_steps, threads=1)
        paths = write_results(results, lay.out)
        _print_table(results)
        console.print(f"total {total_s / 60:.1f} min; wrote {paths['md']}, {paths['json']} and {paths['png']}",
                      highlight=False)
        if not sys.stdout.isatty():
            err_console.print(f"demo finished in {total_s:.0f} s", highlight=False)


__all__ = ["demo"]
