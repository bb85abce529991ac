"""Kinetics-400 / -700 (the cvdfoundation/kinetics-dataset download) reader, shared by both sizes.

Annotations: `<root>/annotations/{train,val,test}.csv` (or `validate.csv`, or the CSVs directly in
the root) with columns label,youtube_id,time_start,time_end,split[,is_cc]. Videos are the
downloader's `<youtube_id>_<start:06d>_<end:06d>.mp4` clips, found anywhere under

    <root>/<split>/                 (as extracted by k400_extractor.sh: flat)
    <root>/videos/<split>/<label>/  (after arrange_by_classes.py: symlinks in class folders)
    <root>/replacement/replacement_for_corrupted_k400/   (K400 replacements, preferred when present)

where <split> may be spelt train/training, val/validate/validation, test/testing. A CSV row whose
clip is found by its full name or, failing that, by its YouTube id, becomes one sample; a row
whose clip is absent is counted as missing media. Class order: sorted label names of train.csv.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator

from uniperceiver.data.format import PrepareSummary
from uniperceiver.data.download import RemoteFile
from uniperceiver.data.preparers._common import Builder, DatasetSpec, Skip, find_first, read_table, walk_files
from uniperceiver.errors import DataError

SPLITS = {
    "train": (["train"], ["train", "training"]),
    "val": (["val", "validate", "validation"], ["val", "validate", "validation"]),
    "test": (["test"], ["test", "testing"]),
}
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi")
COLUMNS = ["label", "youtube_id", "time_start", "time_end"]


def _csv(root: Path, names: list[str], prefix: str) -> Path | None:
    cands = []
    for n in names:
        cands += [f"annotations/{n}.csv", f"{n}.csv", f"annotations/{prefix}_{n}.csv", f"{prefix}_{n}.csv"]
    return find_first(root, cands)


def _index_videos(
    root: Path, dirs: list[str], replacement: Path | None
) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """clip stem -> path and youtube id -> paths over every candidate folder of a split."""
    by_stem: dict[str, Path] = {}
    by_ytid: dict[str, list[Path]] = {}
    folders = [root / "videos" / d for d in dirs] + [root / d for d in dirs]
    if replacement is not None:
        folders.append(replacement)
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in walk_files(folder, VIDEO_SUFFIXES):
            stem = path.stem
            if folder == replacement or stem not in by_stem:
                by_stem[stem] = path
            by_ytid.setdefault(stem[:11], []).append(path)
    return by_stem, by_ytid


def _clip_name(row: dict[str, str], path: Path, lineno: int) -> str:
    try:
        start, end = int(float(row["time_start"])), int(float(row["time_end"]))
    except ValueError:
        raise DataError(
            f"{path}:{lineno}: time_start/time_end should be numbers, got {row['time_start']!r}, {row['time_end']!r}"
        ) from None
    return f"{row['youtube_id']}_{start:06d}_{end:06d}"


def _samples(
    b: Builder, csv_path: Path, index: dict[str, int], by_stem, by_ytid, default_dir: str
) -> Iterator[dict | Skip]:
    for lineno, row, _ in read_table(csv_path, COLUMNS):
        clip = _clip_name(row, csv_path, lineno)
        label = row["label"].strip()
        if label not in index:
            yield Skip("unknown_label", f"{csv_path.name}:{lineno} {label!r}")
            continue
        path = by_stem.get(clip)
        if path is None:
            cands = by_ytid.get(row["youtube_id"], [])
            path = cands[0] if len(cands) == 1 else None
        media = b.rel(path) if path is not None else f"{default_dir}/{clip}.mp4"  # counted as missing
        yield {"id": clip, "media": media, "media_type": "video", "label": index[label]}


def _has_labels(path: Path) -> bool:
    with open(path, "r", encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        if "label" not in header:
            return False
        i = header.index("label")
        return any(len(row) > i and row[i].strip() for row in reader)


_K400 = "https://s3.amazonaws.com/kinetics/400/annotations"
#: The Kinetics sizes this reader prepares. K400: `--download` fetches only the three annotation
#: CSVs; the 450 GB of clips come from cvdfoundation's k400_downloader.sh + k400_extractor.sh.
#: K700-2020: videos and annotations from k700_2020_downloader.sh, no --download.
SPECS: dict[str, DatasetSpec] = {
    "kinetics400": DatasetSpec(
        "kinetics400", "Kinetics-400 video classification",
        "annotations/{train,val,test}.csv and the clips under train/, val/, test/ (cvdfoundation/kinetics-dataset)",
        "video", ("kinetics400",), "per_class",
        downloads=tuple(RemoteFile(f"{_K400}/{s}.csv", f"{s}.csv", extract_to="annotations")
                        for s in ("train", "val", "test")),
    ),
    "kinetics700": DatasetSpec(
        "kinetics700", "Kinetics-700 video classification (pre-training)",
        "annotations/{train,val,test}.csv and the clips under train/, val/ (cvdfoundation/kinetics-dataset, k700-2020)",
        "video", ("kinetics700",), "per_class",
    ),
}


def prepare(
    variant: str, raw_root: Path, out_dir: Path, *, download: bool = False, progress=None, options: dict | None = None
) -> PrepareSummary:
    """Prepare `variant` (kinetics400 or kinetics700); its 1% split is drawn per class (video_raw.py:278-287)."""
    spec = SPECS[variant]
    dataset, layout, prefix = spec.name, spec.layout, spec.name
    b = spec.builder(raw_root, out_dir, download=download, progress=progress, options=options)
    csvs = {split: _csv(raw_root, names, prefix) for split, (names, _dirs) in SPLITS.items()}
    if csvs["train"] is None:
        raise DataError(
            f"{raw_root / 'annotations' / 'train.csv'}: {dataset} annotation CSV not found; expected {layout}"
        )
    labels = sorted({row["label"].strip() for _, row, _ in read_table(csvs["train"], COLUMNS) if row["label"].strip()})
    index = {name: i for i, name in enumerate(labels)}
    replacement = find_first(raw_root, ["replacement/replacement_for_corrupted_k400", "replacement_for_corrupted_k400"])
    for split, (_names, dirs) in SPLITS.items():
        path = csvs[split]
        if path is None:
            continue
        if split == "test" and not _has_labels(path):  # held-out test labels: nothing to classify against
            continue
        b.source(path)
        by_stem, by_ytid = _index_videos(raw_root, dirs, replacement if split == "train" else None)
        default_dir = next((f"{p}{d}" for p in ("videos/", "") for d in dirs if (raw_root / p / d).is_dir()), dirs[0])
        b.write_split(split, _samples(b, path, index, by_stem, by_ytid, default_dir), media_kind="video")
    return b.finish(targets={"classes": labels})
