"""Web image-text pairs (CC3M, CC12M, SBU, YFCC): images the user downloaded + one caption each.

The datasets ship as URL lists, so the layout is the one of the tool that fetched the images.
Accepted, per split folder (`<root>/train/`, `<root>/val/`; or `<root>/` itself = train):

1. img2dataset "files" output (recommended):  <split>/00000/000000012.jpg + 000000012.txt (caption)
       img2dataset --url_list Train_GCC-training.tsv --input_format tsv --url_col url \
                   --caption_col caption --output_format files --output_folder <root>/train
   (CC3M's TSV has no header: add the line "caption<TAB>url" first.)
2. a table <root>/<split>.tsv (tab-separated, open_clip style) or <split>.csv with a header
   holding "filepath" and "caption" (or "title"); paths relative to the raw root.
3. a JSON list <root>/<split>.json of {"image": path, "caption": str} (BLIP/LAVIS style).

One sample per image {"id", "media", "texts": [caption]}; an image without caption is counted
("no_caption"), a missing or broken one as missing / unreadable media.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Iterator

from uniperceiver.data.format import PrepareSummary
from uniperceiver.data.preparers._common import Builder, DatasetSpec, Skip, need, read_json, read_table, walk_files
from uniperceiver.errors import DataError

SHARD_RE = re.compile(r"^\d{5,}$")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
SPLIT_NAMES = {"train": ["train", "training"], "val": ["val", "validation"]}


def _shards(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and SHARD_RE.match(p.name)) if folder.is_dir() else []


def _from_shards(b: Builder, shards: list[Path]) -> Iterator[dict | Skip]:
    for shard in shards:
        for img in walk_files(shard, IMAGE_SUFFIXES):
            txt = img.with_suffix(".txt")
            caption = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else ""
            if not caption:
                yield Skip("no_caption", b.rel(img))
                continue
            yield {"id": f"{shard.name}/{img.stem}", "media": b.rel(img), "media_type": "image", "texts": [caption]}


def _from_table(b: Builder, path: Path) -> Iterator[dict | Skip]:
    delimiter = "\t" if path.suffix == ".tsv" else ","
    with open(path, "r", encoding="utf-8", newline="") as fh:
        header = next(csv.reader(fh, delimiter=delimiter), [])
    cap_col = "caption" if "caption" in header else "title"
    for lineno, row, complete in read_table(path, ["filepath", cap_col], delimiter=delimiter):
        if not complete:
            yield Skip("malformed_row", f"{path.name}:{lineno}")
            continue
        yield from _pair(b, row["filepath"], row[cap_col], f"{path.name}:{lineno}")


def _from_json(b: Builder, path: Path) -> Iterator[dict | Skip]:
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f'{path}: expected a JSON list of {{"image": path, "caption": text}}')
    for i, item in enumerate(data):
        where = f"{path}: [{i}]"
        yield from _pair(b, str(need(item, "image", where)), str(need(item, "caption", where)), where)


def _pair(b: Builder, filepath: str, caption: str, where: str) -> Iterator[dict | Skip]:
    p = Path(filepath.strip())
    if p.is_absolute():
        try:
            p = p.relative_to(b.raw_root)
        except ValueError:
            raise DataError(f"{where}: image path {filepath!r} is outside the raw root {b.raw_root}") from None
    rel = p.as_posix()
    if rel.startswith("../") or rel == "..":
        raise DataError(f"{where}: image path {filepath!r} escapes the raw root {b.raw_root}")
    if not caption.strip():
        yield Skip("no_caption", rel)
        return
    yield {"id": rel, "media": rel, "media_type": "image", "texts": [caption.strip()]}


#: Layout shared by the web image-text pair datasets.
PAIRS_LAYOUT = "train/ (img2dataset files output: 00000/*.jpg + *.txt) or train.tsv (filepath<TAB>caption)"
#: variant -> (description, where the URL list comes from); the images are fetched with img2dataset.
VARIANTS: dict[str, tuple[str, str]] = {
    "cc3m": ("Conceptual Captions 3M image-text pairs (pre-training)",
             "Train_GCC-training.tsv / Validation_GCC-1.1.0-Validation.tsv"),
    "cc12m": ("Conceptual 12M image-text pairs (pre-training)", "cc12m.tsv"),
    "sbu": ("SBU Captions image-text pairs (pre-training)",
            "SBU_captioned_photo_dataset_urls.txt + SBU_captioned_photo_dataset_captions.txt"),
    "yfcc": ("YFCC15M (the CLIP subset of YFCC100M) image-text pairs (pre-training)", "the yfcc15m metadata"),
}


def spec(variant: str) -> DatasetSpec:
    """The declaration of one pair dataset (its few-shot rule: whole images, as COCO's)."""
    description, _urls = VARIANTS[variant]
    return DatasetSpec(variant, description, PAIRS_LAYOUT, "image",
                       (f"{variant}-pt-caption", f"{variant}-pt-retrieval"), "per_image")


def prepare(
    variant: str, raw_root: Path, out_dir: Path, *, download: bool = False, progress=None, options: dict | None = None
) -> PrepareSummary:
    """Prepare one pair dataset (`variant`: cc3m, cc12m, sbu, yfcc) from the layouts above."""
    b = spec(variant).builder(raw_root, out_dir, download=download, progress=progress, options=options)
    found = False
    for split, names in SPLIT_NAMES.items():
        source = None
        for name in names:
            if _shards(raw_root / name):
                source = ("shards", raw_root / name)
            elif (raw_root / f"{name}.tsv").is_file():
                source = ("table", raw_root / f"{name}.tsv")
            elif (raw_root / f"{name}.csv").is_file():
                source = ("table", raw_root / f"{name}.csv")
            elif (raw_root / f"{name}.json").is_file():
                source = ("json", raw_root / f"{name}.json")
            if source:
                break
        if source is None and split == "train" and _shards(raw_root):
            source = ("shards", raw_root)
        if source is None:
            continue
        found = True
        kind, path = source
        b.source(path)
        items = (
            _from_shards(b, _shards(path))
            if kind == "shards"
            else _from_table(b, path)
            if kind == "table"
            else _from_json(b, path)
        )
        b.write_split(split, items, media_kind="image")
    if not found:
        raise DataError(f"{raw_root}: no image-text pairs found; expected {PAIRS_LAYOUT} "
                        f"(the images of {VARIANTS[variant][1]}, fetched with img2dataset)")
    return b.finish()
