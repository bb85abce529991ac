"""`upctl prepare textcls --root DIR --name NAME --option file=data.csv`: a user's labelled texts.

The file (CSV, TSV or JSON lines) has a text column (`text`, `sentence`, `review`, `sentence1`,
or `--option text_key=COLUMN`), a label column (`label`, `class`, `category`, or `--option
label_key=COLUMN`), optionally a second text (`text_b`, `sentence2`, `--option text_b_key=COLUMN`)
and a `split` column (train / val / test; otherwise a seeded per-label val share, `--option
val_fraction=0.1 --option seed=0`). The labels are the class names, sorted (numbers numerically),
or in the order of `--option labels=neg,pos`. A label with a single sample is an error: it can be
neither split nor learned. The task NAME scores the texts as the GLUE tasks are, a cloze read at
`<|spe|>` with the label words as targets: the SST-2 prompt `<s> It is <|spe|>.` for single texts,
the MNLI prompt `<s1> <|spe|> , <s2>` for pairs; `--option words=bad,wonderful` replaces the words
(one per label, e.g. when labels are 0 / 1). Few-shot rule: per_label.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from uniperceiver.data.format import PrepareSummary
from uniperceiver.data.preparers._common import Builder, Skip
from uniperceiver.data.preparers._own import (
    cleanup_failed,
    eval_split_of,
    finish_run,
    fraction_option,
    open_run,
    pick_column,
    read_records,
    seeded_split,
    split_of,
    task_record,
)
from uniperceiver.errors import ConfigError, DataError
from uniperceiver.utils.progress import Progress

LAYOUT = "a CSV, TSV or JSONL file with a text column and a label column"
TEXT_COLUMNS = ("text", "sentence", "review", "sentence1")
TEXT_B_COLUMNS = ("text_b", "sentence2")
LABEL_COLUMNS = ("label", "class", "category")
OPTIONS = {
    "file": "the data file, relative to --root (default: data.csv, .tsv or .jsonl there)",
    "text_key": "column of texts (default: the first of " + ", ".join(TEXT_COLUMNS) + ")",
    "text_b_key": "column of second texts of pairs (default: " + " or ".join(TEXT_B_COLUMNS) + " if present)",
    "label_key": "column of labels (default: the first of " + ", ".join(LABEL_COLUMNS) + ")",
    "labels": "comma-separated labels in class order (default: the labels found, sorted)",
    "words": "comma-separated cloze words, one per label in class order (default: the labels themselves)",
}
DEFAULT_FILES = ("data.csv", "data.tsv", "data.jsonl")


def _data_file(b: Builder, root: Path) -> Path:
    given = b.options.str("file")
    if given is not None:
        return Path(given) if os.path.isabs(given) else root / given
    found = next((root / f for f in DEFAULT_FILES if (root / f).is_file()), None)
    if found is None:
        raise DataError(f"{root}: no data file; pass --option file=data.csv (looked for {', '.join(DEFAULT_FILES)})")
    return found


def _label_order(b: Builder, path: Path, found: list[str]) -> list[str]:
    given = b.options.str("labels")
    if given is None:
        numeric = all(x.lstrip("-").isdigit() for x in found)
        return sorted(found, key=(lambda x: (int(x), x)) if numeric else (lambda x: (x.lower(), x)))
    order = [x.strip() for x in given.split(",") if x.strip()]
    missing = sorted(set(found) - set(order))
    if missing or len(set(order)) != len(order):
        raise ConfigError(f"option labels={given!r} for {b.dataset}: list every label once "
                          f"(found in {path.name}: {', '.join(sorted(found))})")
    return order


def _words(b: Builder, labels: list[str]) -> list[str]:
    given = b.options.str("words")
    if given is None:
        return labels
    words = [w.strip() for w in given.split(",") if w.strip()]
    if len(words) != len(labels) or len(set(words)) != len(words):
        raise ConfigError(f"option words={given!r} for {b.dataset}: give {len(labels)} different words, one per "
                          f"label in the order {', '.join(labels)}")
    return words


def _read(b: Builder, path: Path) -> tuple[list[dict[str, Any]], list[Skip], bool]:
    """Rows as {"text", "text_b"?, "label" (str), "split", "where"}, the skipped rows, and whether pairs."""
    columns, rows = read_records(path)
    text_col = pick_column(path, columns, b.options.str("text_key"), TEXT_COLUMNS, "text", "text_key")
    label_col = pick_column(path, columns, b.options.str("label_key"), LABEL_COLUMNS, "label", "label_key")
    b_given = b.options.str("text_b_key")
    text_b_col = (pick_column(path, columns, b_given, TEXT_B_COLUMNS, "second text", "text_b_key")
                  if b_given is not None else next((c for c in TEXT_B_COLUMNS if c in columns), None))
    split_col = "split" if "split" in columns else None
    b.source(path)
    out: list[dict[str, Any]] = []
    skipped: list[Skip] = []
    for lineno, row in rows:
        where = f"{path}:{lineno}"
        text = " ".join(str(row.get(text_col) or "").split())
        label = str(row.get(label_col) if row.get(label_col) is not None else "").strip()
        if not text or not label:
            skipped.append(Skip("empty_text" if not text else "no_label", where))
            continue
        item = {"text": text, "label": label, "split": split_of(row, split_col, where), "where": where}
        if text_b_col is not None:
            item["text_b"] = " ".join(str(row.get(text_b_col) or "").split())
        out.append(item)
    if not out:
        raise DataError(f"{path}: no row has both a text and a label")
    return out, skipped, text_b_col is not None


def _check_singletons(items: list[dict[str, Any]]) -> None:
    counts: dict[str, int] = {}
    for it in items:
        counts[it["label"]] = counts.get(it["label"], 0) + 1
    for it in items:
        if counts[it["label"]] == 1:
            raise DataError(f"{it['where']}: label {it['label']!r} has only one sample; a label needs at least 2 "
                            "(one to learn from, one to check) -- add samples or drop the row")


def prepare(raw_root: Path, out_dir: Path, *, download: bool = False, progress: Progress | None = None,
            options: dict[str, Any] | None = None) -> PrepareSummary:
    """Write `<data_dir>/NAME` from a labelled text file (module docstring)."""
    run = open_run("textcls", LAYOUT, "text", "per_label", raw_root, out_dir, download=download,
                   progress=progress, options=options, known=OPTIONS)
    raw_root = run.raw_root
    b = run.builder
    try:
        path = _data_file(b, raw_root)
        items, skipped, pairs = _read(b, path)
        _check_singletons(items)
        labels = _label_order(b, path, sorted({it["label"] for it in items}))
        if len(labels) < 2:
            raise DataError(f"{path}: every row has the label {labels[0]!r}; a classification needs at least 2 labels")
        words = _words(b, labels)
        index = {lab: i for i, lab in enumerate(labels)}
        open_ = [it for it in items if it["split"] is None]
        drawn = seeded_split([it["label"] for it in open_], fraction_option(b), b.options.int("seed", 0, minimum=0),
                             "label", [it["where"] for it in open_])
        for it, split in zip(open_, drawn):
            it["split"] = split
        for split in ("train", "val", "test"):
            samples: list[dict | Skip] = [
                {"id": f"{path.stem}-{it['where'].rsplit(':', 1)[1]}", "text": it["text"], "label": index[it["label"]],
                 **({"text_b": it["text_b"]} if pairs else {})}
                for it in items if it["split"] == split]
            if split == "train":
                samples = [*skipped, *samples]
            if any(isinstance(s, dict) for s in samples):
                b.write_split(split, samples, media_kind=None)
        written = [w.split for w in b.writers if w.count]
        prompt = "mnli" if pairs else "sst2"
        tasks = {run.name: task_record(
            "glue", "accuracy", f"{len(labels)}-way text classification of {path.name} as a cloze over "
            f"{{{', '.join(words)}}}", split="train", eval_split=eval_split_of(written), batch_size=16,
            options={"glue_task": prompt, "words": words, "label_smoothing": 0.1, "scale": "text_mlm"})}
        return finish_run(run, tasks, {"classes": words, "labels": labels}, media_type="text")
    except BaseException:
        cleanup_failed(run)
        raise


__all__ = ["LAYOUT", "OPTIONS", "prepare"]
