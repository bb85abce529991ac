"""`upctl bench`: speed and memory of the model, the loaders and decoding, as ratios in one run."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from upctl.common import fail_on_error, progress_callback, report_console, write_json

SECTIONS = ["peak", "train", "memory", "decode", "loader", "eval", "scale"]


def bench(
    quick: bool = typer.Option(False, "--quick", help="Small shapes, base only, one round of 2 timed steps per case (under 3 minutes on a 2-core CPU)."),
    sizes: str = typer.Option("", help="Comma-separated model sizes for the training-step section (default: base quick; tiny,small,base full)."),
    sections: str = typer.Option(",".join(SECTIONS), help=f"Comma-separated sections among {', '.join(SECTIONS)}."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    rounds: int = typer.Option(None, "--rounds", help="ABBA rounds per training-step pair (default: 3 full, 1 quick)."),
    kinds: str = typer.Option("", "--kinds", help="Comma-separated training-step kinds to run (default all): text, image, video, caption, retrieval."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile every training-step case, baselines too (our encoder, as train.compile does)."),
    json_path: Path = typer.Option(None, "--json", help="Write the report (machine + rows) as JSON ('-': standard output)."),
    csv_path: Path = typer.Option(None, "--csv", help="Write the rows as CSV."),
) -> None:
    """Measure training steps (ours vs Hugging Face BertModel and timm ViT at the same shapes), activation
    checkpointing memory, cached vs uncached caption decoding, loaders, the target cache, and scaling.

    Every case runs with warm-up and repeats and reports medians; ratios compare numbers taken in the same run.

    Examples:

      upctl bench --quick

      upctl bench --sections train --sizes base --json bench.json
    """
    import torch

    from uniperceiver.bench.suite import run_suite
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
        with progress_callback("bench") as progress:
            report = run_suite(dev, quick=quick, sizes=size_list, sections=chosen, progress=progress,
                               rounds=rounds, compile=compile,
                               kinds=[k.strip() for k in kinds.split(",") if k.strip()] or None)
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
    by_section: dict[str, list[dict]] = {}
    for row in rows:
        by_section.setdefault(row["section"], []).append(row)
    for section, items in by_section.items():
        keys = [k for k in items[0] if k not in ("section", "name")]
        for item in items[1:]:
            keys += [k for k in item if k not in keys and k not in ("section", "name")]
        table = Table(title=section)
        table.add_column("case")
        for k in keys:
            table.add_column(k, justify="right")
        for item in items:
            table.add_row(item["name"], *[str(item.get(k, "")) for k in keys])
        console.print(table)
