"""What the preparers of a user's own data share (`upctl prepare imagefolder|captions|textcls --name NAME`).

A user's dataset is an ordinary prepared dataset `<data_dir>/NAME/` whose meta.json also records
the task(s) it serves, so `--task NAME` works without a catalog entry:

    "family": the family of its first task,
    "user_tasks": {task name: {"family", "metric", "description", "defaults": {split, eval_split,
                   batch_size, "options": {...}}}}, in order; "tasks" lists the same names.

The catalog (uniperceiver/tasks/catalog.py) turns these records into TaskSpecs. The name goes to
the preparer as the option `name` (the CLI's `--name`), because the preparer signature is the
same for every dataset; the folder written is `<data_dir>/NAME`, not `<data_dir>/imagefolder`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from uniperceiver.data.format import PrepareSummary, discard_staged
from uniperceiver.data.preparers._common import Builder, DatasetSpec
from uniperceiver.errors import ConfigError, DataError
from uniperceiver.utils.progress import Progress

#: The media suffixes a user's files may have (the same lists as the zero-shot YAML task's).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
SPLIT_NAMES = ("train", "val", "test")

OWN_OPTIONS: dict[str, str] = {
    "name": "the prepared dataset's name under the data dir (the CLI's --name): lowercase letters, digits, '-'",
    "val_fraction": "share of each class (or of the items) held out as val when no split is given (default 0.1)",
    "seed": "seed of that split (default 0)",
}


def media_kind(path: str) -> str | None:
    """'image' or 'video' by the file suffix, None for anything else."""
    suffix = os.path.splitext(path)[1].lower()
    return "image" if suffix in IMAGE_SUFFIXES else "video" if suffix in VIDEO_SUFFIXES else None


def dataset_name(kind: str, options: dict | None, reserved: Sequence[str] = ()) -> str:
    """The validated `--name` of a user's dataset (it becomes a folder and a task name)."""
    name = str((options or {}).get("name") or "").strip()
    if not name:
        raise ConfigError(f"upctl prepare {kind} needs --name NAME: the name your dataset (and its task) gets")
    if not NAME_RE.match(name):
        raise ConfigError(f"--name {name!r}: use lowercase letters, digits and '-' (at most 64, starting with a "
                          "letter or digit), e.g. my-flowers")
    if name.startswith("mini") or name in reserved:
        raise ConfigError(f"--name {name!r} is taken by a built-in dataset; choose another name")
    return name


def fraction_option(b: Builder) -> float:
    """`val_fraction`, a share in [0, 1)."""
    raw = b.options.str("val_fraction", "0.1")
    try:
        value = float(raw or "0.1")
    except ValueError:
        raise ConfigError(f"option val_fraction={raw!r} for {b.dataset}: expected a number in [0, 1)") from None
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"option val_fraction={raw!r} for {b.dataset}: expected a number in [0, 1)")
    return value


def seeded_split(groups: Sequence[str], val_fraction: float, seed: int, what: str,
                 where: Sequence[str]) -> list[str]:
    """'train' or 'val' per item, drawn within each group (class or label) with a seeded permutation.

    Every group keeps at least one item in each split (round(fraction * n), at least 1, at most
    n - 1), so a group of one item cannot be split: DataError naming it and the item (`where`).
    With val_fraction 0 everything is train.
    """
    out = ["train"] * len(groups)
    if val_fraction <= 0.0:
        return out
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    for g in sorted(members):
        idx = members[g]
        if len(idx) < 2:
            raise DataError(f"{where[idx[0]]}: {what} {g!r} has only one sample; a {what} needs at least 2 to be "
                            "split into train and val (add samples, remove it, or give the splits yourself)")
        digest = int.from_bytes(hashlib.sha256(g.encode("utf-8")).digest()[:8], "little")
        rng = np.random.default_rng([seed, digest])  # stable across processes (never Python's str hash)
        k = min(len(idx) - 1, max(1, int(round(val_fraction * len(idx)))))
        for j in rng.permutation(len(idx))[:k]:
            out[idx[int(j)]] = "val"
    return out


def task_record(family: str, metric: str, description: str, *, split: str, eval_split: str,
                batch_size: int, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """One entry of meta["user_tasks"] (catalog.py reads it into a TaskSpec)."""
    return {"family": family, "metric": metric, "description": description,
            "defaults": {"split": split, "eval_split": eval_split, "batch_size": batch_size,
                         "options": dict(options or {})}}


def eval_split_of(splits: Sequence[str]) -> str:
    """val when written, else test, else train (a dataset of one split evaluates on what it has)."""
    return next((s for s in ("val", "test") if s in splits), "train")


@dataclass(frozen=True)
class OwnRun:
    """One user dataset being written: its name, folder and Builder."""

    name: str
    out: Path
    builder: Builder
    #: The folder of the user's files, absolute (`~` expanded).
    raw_root: Path


def open_run(kind: str, layout: str, media_type: str, fewshot_rule: str, raw_root: Path, out_dir: Path, *,
             download: bool, progress: Progress | None, options: dict | None, known: dict[str, str]) -> OwnRun:
    """Check the name (not a preparer's) and the raw root, and open a Builder writing `<data_dir>/NAME`."""
    from uniperceiver.data.preparers import PREPARERS

    name = dataset_name(kind, options, list(PREPARERS))
    raw_root = Path(raw_root).expanduser().absolute()
    if download:
        raise DataError(f"{kind} prepares your own files: there is nothing to --download (pass --root DIR)")
    out = Path(out_dir).absolute().parent / name
    spec = DatasetSpec(name=name, description=f"a user's {kind} dataset", layout=layout, media_type=media_type,
                       tasks=(), fewshot_rule=fewshot_rule, options={**OWN_OPTIONS, **known})
    return OwnRun(name, out, spec.builder(raw_root, out, download=False, progress=progress, options=options), raw_root)


def finish_run(run: OwnRun, tasks: dict[str, dict[str, Any]], targets: dict[str, Any] | None = None,
               media_type: str | None = None) -> PrepareSummary:
    """Write meta.json with the task records (`prepare_dataset` then drops manifests of splits no longer written)."""
    b = run.builder
    b.tasks = list(tasks)
    if media_type is not None:
        b.media_type = media_type
    first = next(iter(tasks.values()))
    return b.finish(targets, extra={"family": first["family"], "user_tasks": tasks})


def cleanup_failed(run: OwnRun) -> None:
    """A failed run leaves the previous manifests live and none of its own staged ones."""
    discard_staged([run.out])


# ------------------------------------------------------------------------------------------ tables


def read_records(path: Path) -> tuple[list[str], Iterator[tuple[int, dict[str, Any]]]]:
    """(columns, rows as (line number, {column: value})) of a CSV, TSV or JSON-lines file.

    The format follows the suffix: .jsonl / .json (one object per line), .tsv / .txt (tabs),
    anything else CSV. JSON-lines columns are the keys of the first object.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return _jsonl(path)
    delimiter = "\t" if suffix in (".tsv", ".txt") else ","
    with open(path, "r", encoding="utf-8", newline="") as fh:
        header = next(csv.reader(fh, delimiter=delimiter), None)
    if not header:
        raise DataError(f"{path}: empty file (expected a header line naming the columns)")
    columns = [h.strip().lstrip("\ufeff") for h in header]
    return columns, _table_rows(path, columns, delimiter)


def _table_rows(path: Path, columns: list[str], delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, "r", encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        next(reader, None)
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            yield reader.line_num, {h: (row[i].strip() if i < len(row) else "") for i, h in enumerate(columns)}


def _jsonl(path: Path) -> tuple[list[str], Iterator[tuple[int, dict[str, Any]]]]:
    rows: list[tuple[int, dict[str, Any]]] = []
    with open(path, "r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
            rows.append((lineno, obj))
    if not rows:
        raise DataError(f"{path}: empty file (expected one JSON object per line)")
    return list(rows[0][1]), iter(rows)


def pick_column(path: Path, columns: list[str], chosen: str | None, candidates: Sequence[str], what: str,
                option: str) -> str:
    """The column holding `what`: the one named by --option OPTION=COLUMN, else the first candidate present."""
    if chosen is not None:
        if chosen not in columns:
            raise DataError(f"{path}: option {option}={chosen!r} names no column (found: {', '.join(columns)})")
        return chosen
    found = next((c for c in candidates if c in columns), None)
    if found is None:
        raise DataError(f"{path}: no {what} column (expected one of {', '.join(candidates)}, or --option "
                        f"{option}=COLUMN; found: {', '.join(columns) or 'none'})")
    return found


def split_of(row: dict[str, Any], column: str | None, where: str) -> str | None:
    """The row's split from the `split` column (train / val / test; 'valid', 'validation', 'dev' = val)."""
    if column is None:
        return None
    value = str(row.get(column) or "").strip().lower()
    value = {"valid": "val", "validation": "val", "dev": "val"}.get(value, value)
    if value not in SPLIT_NAMES:
        raise DataError(f"{where}: split {row.get(column)!r} is not one of train, val, test")
    return value


__all__ = ["IMAGE_SUFFIXES", "OWN_OPTIONS", "OwnRun", "VIDEO_SUFFIXES", "cleanup_failed", "dataset_name",
           "eval_split_of", "finish_run", "fraction_option", "media_kind", "open_run", "pick_column",
           "read_records", "seeded_split", "split_of", "task_record"]
