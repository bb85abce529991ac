"""`upctl prepare imagefolder --root DIR --name NAME`: a user's class folders of images or videos.

Layouts (the ImageFolder of timm / torchvision / HF datasets):
- `DIR/<class>/*`: one pool, split into train / val by a seeded draw within each class
  (`--option val_fraction=0.1 --option seed=0`); a class of one file cannot be split (one line);
- `DIR/train/<class>/*` with `DIR/val/<class>/*` and / or `DIR/test/<class>/*`: the splits as given.
Class names are the folder names with '_' read as a space, or the lines of `DIR/classnames.txt`
(one name per class in sorted folder order). An empty class folder is an error; a file that does
not decode is counted (unreadable_media) and left out. The prepared dataset serves the task NAME:
classification against the class names (image_cls or video_cls), few-shot rule per_class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from uniperceiver.data.format import PrepareSummary
from uniperceiver.data.preparers._common import Builder, walk_files
from uniperceiver.data.preparers._imagefolder import class_dirs, folder_samples, read_classnames
from uniperceiver.data.preparers._own import (
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    cleanup_failed,
    eval_split_of,
    finish_run,
    fraction_option,
    open_run,
    seeded_split,
    task_record,
)
from uniperceiver.errors import DataError
from uniperceiver.utils.progress import Progress

LAYOUT = "class folders DIR/<class>/* (or DIR/train/<class>/*, DIR/val/<class>/*, DIR/test/<class>/*)"
SPLIT_FOLDERS = ("train", "val", "test")


def _split_folders(root: Path) -> dict[str, Path]:
    """{split: folder} when DIR has train/ val/ test/ folders holding class folders, else {}."""
    found = {s: root / s for s in SPLIT_FOLDERS if class_dirs(root / s)}
    return found if "train" in found or len(found) >= 2 else {}


def _media_type(pools: dict[str, Path], classes: list[str]) -> str:
    """'image' or 'video' from the files; an empty class folder or a mix of kinds is an error."""
    counts = {"image": 0, "video": 0}
    for folder in pools.values():
        for name in class_dirs(folder):
            n_img = sum(1 for _ in walk_files(folder / name, IMAGE_SUFFIXES))
            n_vid = sum(1 for _ in walk_files(folder / name, VIDEO_SUFFIXES))
            if n_img + n_vid == 0:
                raise DataError(f"{folder / name}: empty class folder (no image or video file: "
                                f"{', '.join(IMAGE_SUFFIXES[:4])}, {', '.join(VIDEO_SUFFIXES[:3])}, ...)")
            counts["image"] += n_img
            counts["video"] += n_vid
    if counts["image"] and counts["video"]:
        raise DataError(f"{next(iter(pools.values()))}: mixes {counts['image']} images and {counts['video']} videos; "
                        "a class-folder dataset holds one kind (put them in two datasets)")
    if len(classes) < 2:
        found = f"only the class folder {classes[0]!r}" if classes else "no class folders"
        raise DataError(f"{next(iter(pools.values()))}: {found}; a classification needs at least 2 (expected {LAYOUT})")
    return "video" if counts["video"] else "image"


def _class_names(b: Builder, root: Path, classes: list[str]) -> list[str]:
    """classnames.txt (one per class, sorted folder order) if present, else folder names with '_' as ' '."""
    path = root / "classnames.txt"
    if path.is_file():
        b.source(path)
        names = read_classnames(path, classes)
        return [names.get(c, [c])[0] for c in classes]
    return [" ".join(c.replace("_", " ").split()) or c for c in classes]


def _write_pooled(b: Builder, root: Path, index: dict[str, int], kind: str) -> None:
    """DIR/<class>/*: a seeded, per-class train / val split."""
    suffixes = IMAGE_SUFFIXES if kind == "image" else VIDEO_SUFFIXES
    items = list(folder_samples(b, root, index, dirs=class_dirs, suffixes=suffixes, media_type=kind,
                                sample_id=b.rel))
    samples = [x for x in items if isinstance(x, dict)]
    folder_of = {i: c for c, i in index.items()}
    splits = seeded_split([folder_of[s["label"]] for s in samples], fraction_option(b),
                          b.options.int("seed", 0, minimum=0), "class", [str(root / s["media"]) for s in samples])
    for split in ("train", "val"):
        chosen = [s for s, where in zip(samples, splits) if where == split]
        if split == "train" or chosen:
            b.write_split(split, chosen, media_kind=kind, total=len(chosen))


def prepare(raw_root: Path, out_dir: Path, *, download: bool = False, progress: Progress | None = None,
            options: dict[str, Any] | None = None) -> PrepareSummary:
    """Write `<data_dir>/NAME` from class folders (module docstring)."""
    run = open_run("imagefolder", LAYOUT, "image", "per_class", raw_root, out_dir, download=download,
                   progress=progress, options=options, known={})
    raw_root = run.raw_root
    b = run.builder
    try:
        pools = _split_folders(raw_root) or {"": raw_root}
        classes = sorted(set().union(*(class_dirs(folder) for folder in pools.values())))
        kind = _media_type(pools, classes)
        index = {c: i for i, c in enumerate(classes)}
        if "" in pools:
            _write_pooled(b, raw_root, index, kind)
        else:
            suffixes = IMAGE_SUFFIXES if kind == "image" else VIDEO_SUFFIXES
            for split, folder in pools.items():
                b.write_split(split, folder_samples(b, folder, index, dirs=class_dirs, suffixes=suffixes,
                                                    media_type=kind, sample_id=b.rel), media_kind=kind)
        b.sources.append(f"class folders under {raw_root}")
        names = _class_names(b, raw_root, classes)
        written = [w.split for w in b.writers if w.count]
        family = "image_cls" if kind == "image" else "video_cls"
        tasks = {run.name: task_record(
            family, "top1", f"{len(names)}-way {kind} classification of {raw_root.name} (class folders)",
            split="train", eval_split=eval_split_of(written), batch_size=32 if kind == "image" else 8)}
        return finish_run(run, tasks, {"classes": names}, media_type=kind)
    except BaseException:
        cleanup_failed(run)
        raise


__all__ = ["LAYOUT", "prepare"]
