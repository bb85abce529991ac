"""Moments in Time (v1/v2) video classification: 339 classes (305 in v2), ~800k clips.

Expected layout under the raw root (the official `Moments_in_Time_Raw.zip`, extracted):

    <root>/moments_categories.txt   "class_name,index" per line (the class order)
    <root>/trainingSet.csv          "class/file.mp4,class,positive_responses,negative_responses" (no header)
    <root>/validationSet.csv
    <root>/training/<class>/<file>.mp4, <root>/validation/<class>/<file>.mp4

The annotation files may also sit in `annotations/` and the video folders in `videos/` (mmaction2
layout). The dataset needs a form, so there is no --download.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator

from uniperceiver.data.format import PrepareSummary
from uniperceiver.data.preparers._common import Builder, DatasetSpec, Skip, find_first, require_file
from uniperceiver.errors import DataError

SPEC = DatasetSpec(
    "mit",
    "Moments in Time video classification (pre-training)",
    "moments_categories.txt, trainingSet.csv, validationSet.csv, training/ and validation/ (Moments_in_Time_Raw)",
    "video",
    ("mit",),
    "per_class",
)
LAYOUT = SPEC.layout
SPLITS = {"train": ("trainingSet.csv", "training"), "val": ("validationSet.csv", "validation")}


def _categories(path: Path) -> list[str]:
    pairs = []
    with open(path, "r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            name, _, idx = line.strip().rpartition(",")
            try:
                pairs.append((int(idx), name))
            except ValueError:
                raise DataError(f"{path}:{lineno}: expected 'class_name,index', got {line.strip()[:80]!r}") from None
    pairs.sort()
    if [i for i, _ in pairs] != list(range(len(pairs))):
        raise DataError(f"{path}: class indices should be 0..{len(pairs) - 1} without gaps")
    return [n for _, n in pairs]


def _samples(b: Builder, csv_path: Path, video_dir: str, index: dict[str, int]) -> Iterator[dict | Skip]:
    with open(csv_path, "r", encoding="utf-8", newline="") as fh:
        for lineno, row in enumerate(csv.reader(fh), 1):
            if not row or not row[0].strip():
                continue
            if len(row) < 2:
                raise DataError(f"{csv_path}:{lineno}: expected 'class/file.mp4,class,...', got {','.join(row)[:80]!r}")
            rel, label = row[0].strip(), row[1].strip()
            if label not in index:
                yield Skip("unknown_label", f"{csv_path.name}:{lineno} {label!r}")
                continue
            yield {
                "id": rel.rsplit(".", 1)[0],
                "media": f"{video_dir}/{rel}",
                "media_type": "video",
                "label": index[label],
            }


def prepare(
    raw_root: Path, out_dir: Path, *, download: bool = False, progress=None, options: dict | None = None
) -> PrepareSummary:
    b = SPEC.builder(raw_root, out_dir, download=download, progress=progress, options=options)
    cats = require_file(
        raw_root, ["moments_categories.txt", "annotations/moments_categories.txt"], "moments_categories.txt"
    )
    b.source(cats)
    classes = _categories(cats)
    index = {n: i for i, n in enumerate(classes)}
    for split, (csv_name, folder) in SPLITS.items():
        ann = find_first(raw_root, [csv_name, f"annotations/{csv_name}"])
        if ann is None:
            if split == "train":
                raise DataError(f"{raw_root / csv_name}: Moments in Time annotation file not found; expected {LAYOUT}")
            continue
        b.source(ann)
        video_dir = (
            folder
            if (raw_root / folder).is_dir() or not (raw_root / "videos" / folder).is_dir()
            else f"videos/{folder}"
        )
        b.write_split(split, _samples(b, ann, video_dir, index), media_kind="video")
    return b.finish(targets={"classes": classes})
