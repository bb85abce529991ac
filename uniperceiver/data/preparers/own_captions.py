"""`upctl prepare captions --root DIR --name NAME --option file=captions.csv`: a user's captioned images or videos.

The file (CSV, TSV or JSON lines; open_clip's `filepath,title` CSV works as is) has a media column
(`filepath`, `path`, `image`, `video`, `file`, or `--option media_key=COLUMN`) holding paths relative
to DIR, and a text column (`caption`, `title`, `text`, `sentence`, or `--option text_key=COLUMN`).
Several rows may name the same medium: their captions are gathered into one sample. An optional
`split` column (train / val / test) gives the splits; otherwise a seeded share of the media goes to
val (`--option val_fraction=0.1 --option seed=0`). Missing or unreadable media are counted and left
out, never fatal. The dataset serves two tasks: NAME-caption (captioning, also `--task NAME`) and
NAME-retrieval (image- or video-text retrieval). Few-shot rule: per_image for images; for videos
a pair view `train_pairs` (one sample per caption) drawn per_pair, as MSVD / MSR-VTT are.
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
    media_kind,
    open_run,
    pick_column,
    read_records,
    seeded_split,
    split_of,
    task_record,
)
from uniperceiver.errors import DataError
from uniperceiver.utils.progress import Progress

LAYOUT = "a captions file (CSV, TSV or JSONL: a media column and a caption column) with media paths relative to DIR"
MEDIA_COLUMNS = ("filepath", "path", "image", "video", "file", "media")
TEXT_COLUMNS = ("caption", "title", "text", "sentence")
DEFAULT_FILES = ("captions.csv", "captions.tsv", "captions.jsonl")
OPTIONS = {
    "file": "the captions file, relative to --root (default: captions.csv, .tsv or .jsonl there)",
    "media_key": "column of media paths (default: the first of " + ", ".join(MEDIA_COLUMNS) + ")",
    "text_key": "column of captions (default: the first of " + ", ".join(TEXT_COLUMNS) + ")",
}


def _caption_file(b: Builder, root: Path) -> Path:
    given = b.options.str("file")
    if given is not None:
        return (root / given) if not os.path.isabs(given) else Path(given)
    found = next((root / f for f in DEFAULT_FILES if (root / f).is_file()), None)
    if found is None:
        raise DataError(f"{root}: no captions file; pass --option file=captions.csv (looked for "
                        f"{', '.join(DEFAULT_FILES)})")
    return found


def _media_rel(b: Builder, value: str) -> str | None:
    """The manifest path of a media cell (relative to the raw root), None when it points outside it."""
    full = Path(value) if os.path.isabs(value) else b.raw_root / value
    rel = os.path.relpath(os.path.normpath(full), b.raw_root)
    return None if rel == ".." or rel.startswith(".." + os.sep) else Path(rel).as_posix()


def _gather(b: Builder, path: Path) -> tuple[dict[str, dict[str, Any]], list[Skip]]:
    """{media: {"texts", "split", "line"}} in file order, plus the rows counted as skipped."""
    columns, rows = read_records(path)
    media_col = pick_column(path, columns, b.options.str("media_key"), MEDIA_COLUMNS, "media", "media_key")
    text_col = pick_column(path, columns, b.options.str("text_key"), TEXT_COLUMNS, "caption", "text_key")
    split_col = "split" if "split" in columns else None
    b.source(path)
    media: dict[str, dict[str, Any]] = {}
    skipped: list[Skip] = []
    for lineno, row in rows:
        where = f"{path}:{lineno}"
        value, text = str(row.get(media_col) or "").strip(), " ".join(str(row.get(text_col) or "").split())
        if not value:
            skipped.append(Skip("no_media_path", where))
            continue
        if not text:
            skipped.append(Skip("empty_caption", where))
            continue
        rel = _media_rel(b, value)
        if rel is None:
            skipped.append(Skip("media_outside_root", value))
            continue
        if media_kind(rel) is None:
            skipped.append(Skip("not_image_or_video", value))
            continue
        entry = media.setdefault(rel, {"texts": [], "split": split_of(row, split_col, where), "line": where})
        entry["texts"].append(text)
    if not media:
        raise DataError(f"{path}: no row names an image or video with a caption")
    return media, skipped


def _kind(path: Path, media: dict[str, dict[str, Any]]) -> str:
    kinds = {media_kind(m) for m in media}
    if len(kinds) > 1:
        n_vid = sum(1 for m in media if media_kind(m) == "video")
        raise DataError(f"{path}: mixes {len(media) - n_vid} images and {n_vid} videos; a captions dataset holds "
                        "one kind (write two files)")
    return str(kinds.pop())


def _assign_splits(b: Builder, path: Path, media: dict[str, dict[str, Any]]) -> None:
    """Fill in the split of media the file left open: a seeded val share over the media."""
    open_ = [m for m, e in media.items() if e["split"] is None]
    if not open_:
        return
    if len(open_) < 2:
        for m in open_:
            media[m]["split"] = "train"
        return
    drawn = seeded_split([""] * len(open_), fraction_option(b), b.options.int("seed", 0, minimum=0), "file",
                         [str(path)] * len(open_))
    for m, split in zip(open_, drawn):
        media[m]["split"] = split


def prepare(raw_root: Path, out_dir: Path, *, download: bool = False, progress: Progress | None = None,
            options: dict[str, Any] | None = None) -> PrepareSummary:
    """Write `<data_dir>/NAME` from a captions file (module docstring)."""
    run = open_run("captions", LAYOUT, "image", "per_image", raw_root, out_dir, download=download,
                   progress=progress, options=options, known=OPTIONS)
    raw_root = run.raw_root
    b = run.builder
    try:
        path = _caption_file(b, raw_root)
        media, skipped = _gather(b, path)
        kind = _kind(path, media)
        _assign_splits(b, path, media)
        for split in ("train", "val", "test"):
            samples: list[dict | Skip] = [{"id": m, "media": m, "media_type": kind, "texts": e["texts"]}
                                          for m, e in media.items() if e["split"] == split]
            if split == "train":
                samples = [*skipped, *samples]  # rows left out are counted once, under train
            if any(isinstance(s, dict) for s in samples):
                b.write_split(split, samples, media_kind=kind)
        pool = "train"
        if kind == "video":  # the reference draws video few-shot sets per (video, caption) pair
            b.fewshot_rule = "per_item"
            b.add_view("train_pairs", ["train"], unit="pair", fewshot_rule="per_pair",
                       reference="one sample per (video, caption) pair, as MSVD / MSR-VTT train")
            pool = "train_pairs" if "train_pairs" in b.views else "train"
        written = [w.split for w in b.writers if w.count]
        if "train" not in written:
            raise DataError(f"{path}: no usable medium in the train split (see the skipped counts)")
        eval_split = eval_split_of(written)
        batch = 32 if kind == "image" else 8
        tasks = {
            f"{run.name}-caption": task_record("caption", "Bleu_4", f"captioning of the {kind}s of {path.name}",
                                               split=pool, eval_split=eval_split, batch_size=batch),
            f"{run.name}-retrieval": task_record("retrieval", "rsum", f"{kind}-text retrieval on {path.name}",
                                                 split=pool, eval_split=eval_split, batch_size=batch),
        }
        return finish_run(run, tasks, media_type=kind)
    except BaseException:
        cleanup_failed(run)
        raise


__all__ = ["LAYOUT", "MEDIA_COLUMNS", "OPTIONS", "TEXT_COLUMNS", "prepare"]
