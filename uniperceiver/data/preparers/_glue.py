"""GLUE tasks from the official TSV files (as fetched by GLUE's download_glue_data.py).

One prepared dataset per task (`glue-sst2`, `glue-mnli`, ...). Expected layout: the raw root is
the GLUE data folder holding the task folders, or a task folder itself:

    <root>/SST-2/train.tsv, dev.tsv, test.tsv
    <root>/MNLI/train.tsv, dev_matched.tsv, dev_mismatched.tsv, test_matched.tsv, test_mismatched.tsv

Columns read (by header name; CoLA's train/dev files have no header and are read by position):
CoLA source,label,original,sentence | SST-2 sentence,label | MRPC Quality,#1 String,#2 String |
QQP question1,question2,is_duplicate | STS-B sentence1,sentence2,score | MNLI sentence1,sentence2,gold_label |
QNLI question,sentence,label | RTE / WNLI sentence1,sentence2,label.

Splits: train, val (dev / dev_matched), val_mismatched (MNLI), test, test_mismatched (MNLI);
test files have no labels, so their samples carry only the text. Labels are class indices in the
order of targets.classes, which is the order of the reference's cloze answers (SST-2 {bad,
wonderful}, CoLA {incorrect, correct}, pairs {no, yes}, MNLI {no, maybe, yes}); STS-B keeps the raw
0-5 similarity score as a float. Rows with a wrong number of fields are counted as
"malformed_row" (QQP has a few), unknown labels as "unknown_label".
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from uniperceiver.data.download import RemoteFile
from uniperceiver.data.format import PrepareSummary
from uniperceiver.data.preparers._common import DatasetSpec, Skip, read_table
from uniperceiver.errors import DataError

_URL = "https://dl.fbaipublicfiles.com/glue/data"


@dataclass(frozen=True)
class GlueTask:
    name: str  # dataset name suffix: sst2
    folder: str  # SST-2
    text: str  # column of the (first) sentence
    text_b: str | None  # column of the second sentence (pairs)
    label: str | None  # label column (None: no labels)
    classes: list[str] | None  # class names; None = regression (float label)
    label_map: dict[str, int] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=lambda: {"train": "train.tsv", "val": "dev.tsv", "test": "test.tsv"})
    positional: tuple[str, ...] = ()  # header names for files without a header (CoLA train/dev)
    zip_name: str | None = None  # dl.fbaipublicfiles.com archive


BINARY = {"0": 0, "1": 1}
ENTAIL = {"not_entailment": 0, "entailment": 1}
TASKS: dict[str, GlueTask] = {
    "cola": GlueTask(
        "cola",
        "CoLA",
        "sentence",
        None,
        "label",
        ["unacceptable", "acceptable"],
        BINARY,
        positional=("source", "label", "original_label", "sentence"),
        zip_name="CoLA.zip",
    ),
    "sst2": GlueTask(
        "sst2", "SST-2", "sentence", None, "label", ["negative", "positive"], BINARY, zip_name="SST-2.zip"
    ),
    "mrpc": GlueTask("mrpc", "MRPC", "#1 String", "#2 String", "Quality", ["not_equivalent", "equivalent"], BINARY),
    "qqp": GlueTask(
        "qqp",
        "QQP",
        "question1",
        "question2",
        "is_duplicate",
        ["not_duplicate", "duplicate"],
        BINARY,
        zip_name="QQP-clean.zip",
    ),
    "stsb": GlueTask("stsb", "STS-B", "sentence1", "sentence2", "score", None, zip_name="STS-B.zip"),
    "mnli": GlueTask(
        "mnli",
        "MNLI",
        "sentence1",
        "sentence2",
        "gold_label",
        ["contradiction", "neutral", "entailment"],
        {"contradiction": 0, "neutral": 1, "entailment": 2},
        files={
            "train": "train.tsv",
            "val": "dev_matched.tsv",
            "val_mismatched": "dev_mismatched.tsv",
            "test": "test_matched.tsv",
            "test_mismatched": "test_mismatched.tsv",
        },
        zip_name="MNLI.zip",
    ),
    "qnli": GlueTask(
        "qnli", "QNLI", "question", "sentence", "label", ["not_entailment", "entailment"], ENTAIL, zip_name="QNLIv2.zip"
    ),
    "rte": GlueTask(
        "rte", "RTE", "sentence1", "sentence2", "label", ["not_entailment", "entailment"], ENTAIL, zip_name="RTE.zip"
    ),
    "wnli": GlueTask(
        "wnli", "WNLI", "sentence1", "sentence2", "label", ["not_entailment", "entailment"], BINARY, zip_name="WNLI.zip"
    ),
}


def _task_dir(root: Path, task: GlueTask) -> Path:
    if (root / task.folder / "train.tsv").is_file() or (root / task.folder).is_dir():
        return root / task.folder
    if (root / "train.tsv").is_file():
        return root
    raise DataError(f"{root / task.folder / 'train.tsv'}: GLUE {task.folder} not found; expected {layout(task)}")


def layout(task: GlueTask) -> str:
    return f"{task.folder}/{{{','.join(task.files.values())}}} (the official GLUE TSV files)"


def _rows(path: Path, task: GlueTask, split: str) -> Iterator[tuple[int, dict[str, str], bool]]:
    if task.positional and not split.startswith("test"):
        with open(path, "r", encoding="utf-8", newline="") as fh:
            for lineno, row in enumerate(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
                if row:
                    yield lineno, dict(zip(task.positional, row)), len(row) == len(task.positional)
        return
    required = [task.text] + ([task.text_b] if task.text_b else [])
    if not split.startswith("test") and task.label:
        required.append(task.label)
    yield from read_table(path, required, delimiter="\t", quoting=csv.QUOTE_NONE)


def _samples(path: Path, task: GlueTask, split: str) -> Iterator[dict | Skip]:
    labelled = not split.startswith("test")
    for n, (lineno, row, complete) in enumerate(_rows(path, task, split)):
        where = f"{path.name}:{lineno}"
        if not complete:
            yield Skip("malformed_row", where)
            continue
        sid = row.get("index") or row.get("id") or str(n)
        sample: dict = {"id": sid.strip(), "text": row[task.text].strip()}
        if task.text_b:
            sample["text_b"] = row[task.text_b].strip()
        if labelled and task.label:
            raw = row[task.label].strip()
            if task.classes is None:
                try:
                    sample["label"] = float(raw)
                except ValueError:
                    yield Skip("unknown_label", f"{where} {raw!r}")
                    continue
            elif raw in task.label_map:
                sample["label"] = task.label_map[raw]
            else:
                yield Skip("unknown_label", f"{where} {raw!r}")
                continue
        yield sample


def spec(variant: str) -> DatasetSpec:
    """The declaration of `glue-<variant>`: labels are drawn per class for the 1% split (GLUE.py:167-182)."""
    task = TASKS[variant]
    name = f"glue-{task.name}"
    downloads = (RemoteFile(f"{_URL}/{task.zip_name}", task.zip_name, extract=True),) if task.zip_name else ()
    return DatasetSpec(name, f"GLUE {task.folder} (text classification / regression)", layout(task), "text",
                       (name,), "per_label" if task.classes else "per_item", downloads=downloads)


def prepare(
    variant: str, raw_root: Path, out_dir: Path, *, download: bool = False, progress=None, options: dict | None = None
) -> PrepareSummary:
    """Prepare `glue-<variant>` (variant: a key of TASKS) from the official TSV files."""
    task = TASKS[variant]
    declared = spec(variant)
    if download and not declared.downloads:
        raise DataError(
            f"{declared.name} has no single public archive; fetch it with GLUE's download_glue_data.py and pass --root DIR"
        )
    b = declared.builder(raw_root, out_dir, download=download, progress=progress, options=options)
    folder = _task_dir(raw_root, task)
    if not (folder / task.files["train"]).is_file():
        raise DataError(
            f"{folder / task.files['train']}: GLUE {task.folder} training file not found; expected {layout(task)}"
        )
    for split, fname in task.files.items():
        path = folder / fname
        if path.is_file():
            b.source(path)
            b.write_split(split, _samples(path, task, split), media_kind=None)
    targets = {"classes": task.classes} if task.classes else {}
    return b.finish(targets=targets, extra={"label_type": "class" if task.classes else "float"})
