"""`upctl bench`: speed and memory of the model, the loaders and decoding, as ratios in one run."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from upctl.common import err_console, fail_on_error, progress_callback, report_console, write_json

SECTIONS = ["peak", "train", "memory", "decode", "loader", "eval", "scale", "checkpoint"]
#: Run when --sections is not given: `checkpoint` (minutes per model size) only when asked for.
DEFAULT_SECTIONS = [s for s in SECTIONS if s != "checkpoint"]


def bench(
    quick: bool = typer.Option(False, "--quick", help="Small shapes, base only, one round of 2 timed steps per case (under 3 minutes on a 2-core CPU)."),
    sizes: str = typer.Option("", help="Comma-separated model sizes for the training-step and checkpoint sections (default: base quick; tiny,small,base full)."),
    sections: str = typer.Option(",".join(DEFAULT_SECTIONS), help=f"Comma-separated sections among {', '.join(SECTIONS)} (checkpoint: save / resume per --sizes, default base,large, base with --quick; only when named)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    rounds: int = typer.Option(None, "--rounds", help="ABBA rounds per training-step pair (default: 3 full, 1 quick)."),
    kinds: str = typer.Option("", "--kinds", help="Comma-separated training-step kinds to run (default all): text, image, video, caption, retrieval."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile every training-step case, baselines too (our encoder, as train.compile does)."),
    compile_scope: str = typer.Option("encoder", "--compile-scope", help="With --compile, what of our step is compiled: encoder (as train.compile) or step (embeddings, encoder, head and loss in one graph)."),
    compile_mode: str = typer.Option("default", "--compile-mode", help="With --compile, torch.compile's mode for our step: default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs."),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="Capture our whole training step (optimizer too) in one CUDA graph and time its replays (CUDA only)."),
    optim_state: str = typer.Option("fp32", "--optim-state", help="AdamW moments for our step: fp32 (torch's fused AdamW) or bf16 (stochastic rounding, compiled update on CUDA)."),
    loss: str = typer.Option("plain", "--loss", help="Contrastive loss of our image-text pairs: plain or chunked (modeling/contrastive.py)."),
    levers: str = typer.Option("", "--levers", help="Instead of the flags above, named levers, one set of cases each: eager, compiled, step, autotune, graphs, bf16-optim, chunked-loss, stacked, eager-graphs; NAME:kind+kind restricts one to some kinds. Adds a lever table."),
    baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="Run BertModel / timm ViT beside our text / image steps."),
    jobs: int = typer.Option(None, "--jobs", help="Warm up (compile) N training-step cases side by side in long-lived workers, then time them one at a time."),
    case_timeout: float = typer.Option(900.0, "--case-timeout", help="Seconds one training-step case may take for its warm-up, and again for each timed run."),
    keep_going: bool = typer.Option(False, "--keep-going", help="A training-step case that fails or times out becomes an error row instead of ending the run."),
    wait_for: Path = typer.Option(None, "--wait-for", help="Before timing (after --jobs warm-ups), wait until this file exists (at most --case-timeout): lets a GPU job run beside the warm-ups."),
    jsonl_path: Path = typer.Option(None, "--jsonl", help="Append every row to this JSON-lines file as it is measured."),
    json_path: Path = typer.Option(None, "--json", help="Write the report (machine + rows) as JSON ('-': standard output)."),
    csv_path: Path = typer.Option(None, "--csv", help="Write the rows as CSV."),
) -> None:
    """Measure training steps (ours vs Hugging Face BertModel and timm ViT at the same shapes), activation
    checkpointing memory, cached vs uncached caption decoding, loaders, the target cache, and scaling.

    Every case runs with warm-up and repeats and reports medians; ratios compare numbers taken in the same run.

    Examples:

      upctl bench --quick

      upctl bench --sections train --sizes base --json bench.json

      upctl bench --sections checkpoint                # base and large, old vs new

      upctl bench --device cuda --sections train --sizes base --kinds image,retrieval --levers compiled,step,graphs:image --jobs 4 --keep-going
    """
    import torch

    from uniperceiver.bench.suite import StepOptions, parse_levers, run_suite
    from uniperceiver.errors import UpctlError

    console = report_console(json_path)
    with fail_on_error():
        chosen = [s.strip() for s in sections.split(",") if s.strip()]
        unknown = sorted(set(chosen) - set(SECTIONS))
        if unknown:
            raise UpctlError(f"unknown bench section(s) {unknown}; choose among {', '.join(SECTIONS)}")
        if device == "auto":
            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        elif device in ("cpu", "cuda"):
            if device == "cuda" and not torch.cuda.is_available():
                raise UpctlError("--device cuda: no CUDA device is available")
            dev = torch.device(device)
        else:
            raise UpctlError(f"--device {device!r}: expected auto, cpu or cuda")
        size_list = [s.strip() for s in sizes.split(",") if s.strip()] or None
        console.print(f"benchmarking on {dev} ({'quick' if quick else 'full'}): {', '.join(chosen)}")
        lever_list = parse_levers(levers) if levers.strip() else None
        flags = {"compile_scope": compile_scope, "compile_mode": compile_mode, "cuda_graphs": cuda_graphs,
                 "optim_state": optim_state, "loss": loss}
        defaults = {"compile_scope": "encoder", "compile_mode": "default", "cuda_graphs": False,
                    "optim_state": "fp32", "loss": "plain"}
        from uniperceiver.bench.train_step import COMPILE_MODES, COMPILE_SCOPES, LOSSES, OPTIM_STATES

        for flag, value, allowed in (("--compile-scope", compile_scope, COMPILE_SCOPES),
                                     ("--compile-mode", compile_mode, COMPILE_MODES),
                                     ("--optim-state", optim_state, OPTIM_STATES), ("--loss", loss, LOSSES)):
            if value not in allowed:
                raise UpctlError(f"{flag} {value!r}: expected one of {', '.join(allowed)}")
        overrides = {k: v for k, v in flags.items() if v != defaults[k]}
        if overrides and not compile and {"compile_scope", "compile_mode"} & overrides.keys():
            raise UpctlError("--compile-scope and --compile-mode need --compile")
        with progress_callback("bench") as progress:
            steps = StepOptions(rounds=rounds, compile=compile,
                                kinds=[k.strip() for k in kinds.split(",") if k.strip()] or None,
                                levers=lever_list, overrides=overrides or None, baselines=baselines, jobs=jobs,
                                case_timeout=case_timeout, keep_going=keep_going,
                                wait_for=str(wait_for) if wait_for else None)
            report = run_suite(dev, quick=quick, sizes=size_list, sections=chosen, progress=progress, steps=steps,
                               sink=str(jsonl_path) if jsonl_path else None,
                               log=lambda line: err_console.print(line, markup=False, highlight=False))
    _print(report.rows, console)
    if json_path:
        write_json(json_path, report.to_dict())
    if csv_path:
        buf = io.StringIO()
        keys = sorted({k for row in report.rows for k in row})
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(report.rows)
        from uniperceiver.utils.files import atomic_write_text

        atomic_write_text(csv_path, buf.getvalue())
    console.print(json.dumps(report.machine))


def _print(rows: list[dict], console: Console) -> None:
    """One table per section; a section wider than the console is split into tables of fewer columns
    (the case column repeated), so headers stay whole at 80 columns (a log file, CI) instead of
    shrinking to `median…`."""
    by_section: dict[str, list[dict]] = {}
    for row in rows:
        by_section.setdefault(row["section"], []).append(row)
    for section, items in by_section.items():
        keys = [k for k in items[0] if k not in ("section", "name")]
        for item in items[1:]:
            keys += [k for k in item if k not in keys and k not in ("section", "name")]
        cells = {k: [str(item.get(k, "")) for item in items] for k in keys}
        names = [str(item["name"]) for item in items]
        name_width = min(max(len("case"), *(len(n) for n in names)), max(12, console.width // 3))
        groups = _column_groups(keys, cells, name_width, console.width)
        if len(groups) > 1 and len(items) < len(keys):  # few cases, many measures: one line per measure
            console.print(_vertical_table(section, names, keys, cells, name_width))
            continue
        for i, group in enumerate(groups):
            title = section if len(groups) == 1 else f"{section} ({i + 1}/{len(groups)})"
            table = Table(title=title)
            table.add_column("case", overflow="fold", max_width=name_width)
            for k in group:
                table.add_column(k, justify="right", no_wrap=True, min_width=len(k))
            for row, name in enumerate(names):
                table.add_row(name, *[cells[k][row] for k in group])
            console.print(table)


def _vertical_table(section: str, names: list[str], keys: list[str], cells: dict[str, list[str]],
                    name_width: int) -> Table:
    """case | measure | value, one line per measure: readable at any width."""
    table = Table(title=section)
    table.add_column("case", overflow="fold", max_width=name_width)
    table.add_column("measure", no_wrap=True)
    table.add_column("value", justify="right", overflow="fold")
    for row, name in enumerate(names):
        present = [k for k in keys if cells[k][row] != ""]
        for j, k in enumerate(present):
            table.add_row(name if j == 0 else "", k, cells[k][row], end_section=j == len(present) - 1)
    return table


def _column_groups(keys: list[str], cells: dict[str, list[str]], name_width: int, width: int) -> list[list[str]]:
    """Split the value columns into runs that fit `width` beside the case column (a rich table
    spends 3 characters per column on padding and rules, plus 1 for the closing rule)."""
    groups: list[list[str]] = [[]]
    used = name_width + 4
    for k in keys:
        need = max(len(k), *(len(v) for v in cells[k])) + 3
        if groups[-1] and used + need > width:
            groups.append([])
            used = name_width + 4
        groups[-1].append(k)
        used += need
    return [g for g in groups if g] or [[]]
