"""`upctl prepare DATASET`: index a downloaded dataset into the prepared format (docs/DATA-FORMAT.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from uniperceiver.data.preparers import OWN_DATA, PREPARERS, UnknownDatasetError
from uniperceiver.errors import ConfigError
from upctl.common import fail_on_error, progress_callback, report_console, write_json


def _table(summary) -> Table:
    table = Table(title=f"{summary.dataset} -> {summary.out_dir}", title_justify="left")
    table.add_column("split")
    table.add_column("samples", justify="right")
    table.add_column("skipped", justify="right")
    table.add_column("reasons")
    for split, n in summary.splits.items():
        skipped = summary.skipped.get(split, {})
        reasons = ", ".join(f"{r}: {c:,}" for r, c in skipped.items())
        table.add_row(split, f"{n:,}", f"{sum(skipped.values()):,}", reasons)
    return table


def _check_dataset_name(dataset: str) -> None:
    """An unknown name: the closest known ones first (`upctl prepare cocoo` -> coco), then all of them."""
    if dataset in PREPARERS:
        return
    import difflib

    close = difflib.get_close_matches(dataset.lower(), list(PREPARERS), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UnknownDatasetError(f"unknown dataset {dataset!r}{hint}; known datasets: {', '.join(sorted(PREPARERS))}")


def _own_options(dataset: str, name: str | None, options: dict) -> dict:
    """`--name` goes to the preparers of a user's own files as the option `name`; a name that a catalog
    task or alias already uses would be shadowed by it, so it is refused here (the catalog lives above data)."""
    if name is None:
        if dataset in OWN_DATA and not options.get("name"):
            raise ConfigError(f"upctl prepare {dataset} needs --name NAME: the name your dataset (and its task) gets")
        if dataset not in OWN_DATA:
            return options
        name = str(options["name"])
    if dataset not in OWN_DATA:
        raise ConfigError(f"--name applies to your own data ({', '.join(OWN_DATA)}), not to {dataset!r}")
    from uniperceiver.tasks.catalog import ALIASES, CATALOG

    taken = [t for t in (name, f"{name}-caption", f"{name}-retrieval") if t in CATALOG or t in ALIASES]
    if taken:
        raise ConfigError(f"--name {name!r}: the catalog task {taken[0]!r} has that name; choose another name")
    return {**options, "name": name}


def prepare(
    dataset: str = typer.Argument(..., help=f"Dataset to prepare: {', '.join(sorted(PREPARERS))}."),
    root: Optional[Path] = typer.Option(
        None,
        "--root",
        help="Raw download folder (default: <data-dir>/raw/<dataset>). See the layout in the error or docs.",
    ),
    data_dir: Optional[Path] = typer.Option(
        None, "--data-dir", help="Prepared-data folder (default: $UPCTL_DATA, else ./data)."
    ),
    download: bool = typer.Option(
        False,
        "--download",
        help="Fetch the public files first (COCO images, VQAv2, GLUE, MSVD, MSR-VTT, VG, K400 annotations).",
    ),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Also write the summary as JSON to this file ('-': standard output)."),
    name: Optional[str] = typer.Option(
        None, "--name", help="imagefolder, captions, textcls: the name of the prepared dataset and of its task(s)."),
    option: Optional[list[str]] = typer.Option(
        None,
        "--option",
        "-o",
        help="Preparer option key=value, repeatable: check=decode|verify|exists, workers=N, limit=N, mirror=URL, "
        "and per-dataset ones (e.g. min_count=9 for vqav2).",
    ),
) -> None:
    """Index a downloaded dataset: check every image / video, write one manifest per split and meta.json.

    Media stay where they are; the prepared folder holds JSON-lines manifests with paths relative to
    the raw root. Missing or unreadable files are counted per reason and left out. Re-running gives
    the same manifests; an interrupted run never leaves a half-written file.

    Examples:

      upctl prepare mini

      upctl prepare coco --root /data/coco

      upctl prepare vqav2 --root /data/coco --option min_count=9 --json vqav2-prepare.json

      upctl prepare glue-sst2 --root /data/glue_data

      upctl prepare imagenet --root /data/imagenet --option check=verify --option workers=16

      upctl prepare msvd --download --data-dir ~/upctl-data

      upctl prepare imagefolder --root ~/photos/flowers --name my-flowers

      upctl prepare captions --root ~/clips --name my-clips --option file=captions.csv

      upctl prepare textcls --root ~/reviews --name my-reviews --option file=reviews.jsonl
    """
    from uniperceiver.config.loading import parse_key_values
    from uniperceiver.data.format import prepare_dataset
    from uniperceiver.data.preparers import get_preparer

    with fail_on_error():
        options = parse_key_values(option, "--option")
        _check_dataset_name(dataset)  # unknown name: suggestions and the known ones, before any work
        options = _own_options(dataset, name, options)
        get_preparer(dataset)
        with progress_callback(f"prepare {dataset}") as progress:
            summary = prepare_dataset(dataset, root, data_dir, download=download, progress=progress, options=options)
        if json_file is not None:
            write_json(json_file, summary.to_dict())
    console = report_console(json_file)
    console.print(_table(summary))
    for split, reasons in summary.examples.items():
        for reason, examples in reasons.items():
            console.print(f"  {split} {reason}: e.g. {', '.join(examples[:3])}", highlight=False)
    console.print(
        f"media missing: {summary.missing_media:,}   unreadable: {summary.unreadable_media:,}   "
        f"time: {summary.seconds:.1f} s",
        highlight=False,
    )
