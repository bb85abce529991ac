"""Web image-text pairs (CC3M, CC12M, SBU, YFCC): images the user downloaded + one caption each.

The datasets ship as URL lists, so the layout is the one of the tool that fetched the images.
Accepted, per split folder (`<root>/train/`, `<root>/val/`; or `<root>/` itself = train):

1. img2dataset "webdataset" output (recommended at scale): <split>/00000.tar, 00001.tar, ... each
   holding <key>.jpg + <key>.txt (caption) + <key>.json, with 00000_stats.json / 00000.parquet beside
       img2dataset --url_list cc12m.tsv --input_format tsv --url_col url --caption_col caption \
                   --output_format webdataset --output_folder <root>/train
   The tars are indexed once (data/shards.py: one pass over the member headers); a sample's media is
   "<shard>.tar#<member>" plus the member's byte offset and size, read by seeking. Members are not
   decoded here (an epoch's worth of work at web scale; `--option check` applies to loose files):
   a corrupt one is counted and skipped by the loaders. A damaged tar keeps the samples before the
   damage, counts the rest ("truncated_shard") and warns once naming the shard. `--option
   workers=N` indexes N shards at a time. meta.json "shards" lists each tar with its sample count
   (the stats file's "successes" when present, else the count of the index).
2. img2dataset "files" output:  <split>/00000/000000012.jpg + 000000012.txt (caption)
       img2dataset --url_list Train_GCC-training.tsv --input_format tsv --url_col url \
                   --caption_col caption --output_format files --output_folder <root>/train
   (CC3M's TSV has no header: add the line "caption<TAB>url" first.)
3. a table <root>/<split>.tsv (tab-separated, open_clip style) or <split>.csv with a header
   holding "filepath" and "caption" (or "title"); paths relative to the raw root.
4. a JSON list <root>/<split>.json of {"image": path, "caption": str} (BLIP/LAVIS style).

One sample per image {"id", "media", "texts": [caption]}; an image without caption is counted
("no_caption"), a missing or broken one as missing / unreadable media.
"""

from __future__ import annotations

import csv
import re
import warnings
from pathlib import Path
from typing import Iterator

from uniperceiver.data import shards as tars
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


def _from_tars(b: Builder, paths: list[Path], records: list[dict]) -> Iterator[dict | Skip]:
    """Samples of img2dataset webdataset shards, in shard then tar order; one record per shard."""
    for index in tars.index_shards(paths, b.workers):
        tar = index.path
        expected = tars.stats_successes(tar)
        rel = b.rel(tar)
        kept = 0
        for key, members in index.samples.items():
            image = tars.image_member(members)
            if image is None:
                yield Skip("no_image", f"{rel}#{key}")
                continue
            if not tars.clean_name(image.name):
                yield Skip("bad_member_name", f"{rel}#{image.name}")
                continue
            caption = index.captions.get(key, "").strip()
            if not caption:
                yield Skip("no_caption", f"{rel}#{key}")
                continue
            kept += 1
            yield {"id": f"{tar.stem}/{key}", "media": tars.member_ref(rel, image), "media_offset": image.offset,
                   "media_size": image.size, "media_type": "image", "texts": [caption]}
        seen = len(index.samples) + len(index.cut_keys)
        if index.damage:
            lost = max(len(index.cut_keys), (expected or 0) - len(index.samples))
            warnings.warn(f"{tar}: damaged shard ({index.damage}); kept the {len(index.samples)} samples "
                          f"before the damage, {lost} lost", stacklevel=2)
            for key in index.cut_keys:
                yield Skip("truncated_shard", f"{rel}#{key}")
            for _ in range(lost - len(index.cut_keys)):  # known from the stats file only
                yield Skip("truncated_shard", f"{rel} (after the damage)")
        records.append({"file": rel, "samples": expected if expected is not None else seen,
                        "counted_from": "stats" if expected is not None else "tar", "indexed": kept,
                        "damaged": bool(index.damage)})


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
PAIRS_LAYOUT = ("train/ (img2dataset webdataset output: 00000.tar, ...; or files output: 00000/*.jpg + *.txt) "
                "or train.tsv (filepath<TAB>caption)")
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
    shard_records: dict[str, list[dict]] = {}
    for split, names in SPLIT_NAMES.items():
        source = _find_source(raw_root, names) or (_root_source(raw_root) if split == "train" else None)
        if source is None:
            continue
        kind, path = source
        b.source(path)
        if kind == "tars":
            records = shard_records.setdefault(split, [])
            b.write_split(split, _from_tars(b, tars.find_shards(path), records), media_kind=None)
            continue
        items = (
            _from_shards(b, _shards(path))
            if kind == "shards"
            else _from_table(b, path)
            if kind == "table"
            else _from_json(b, path)
        )
        b.write_split(split, items, media_kind="image")
    if not b.writers:
        raise DataError(f"{raw_root}: no image-text pairs found; expected {PAIRS_LAYOUT} "
                        f"(the images of {VARIANTS[variant][1]}, fetched with img2dataset)")
    return b.finish(extra={"shards": shard_records} if shard_records else None)


def _find_source(raw_root: Path, names: list[str]) -> tuple[str, Path] | None:
    """The first layout found for one split (module docstring, in that order of preference)."""
    for name in names:
        if tars.find_shards(raw_root / name):
            return ("tars", raw_root / name)
        if _shards(raw_root / name):
            return ("shards", raw_root / name)
        for suffix, kind in ((".tsv", "table"), (".csv", "table"), (".json", "json")):
            if (raw_root / f"{name}{suffix}").is_file():
                return (kind, raw_root / f"{name}{suffix}")
    return None


def _root_source(raw_root: Path) -> tuple[str, Path] | None:
    """Shards directly in the raw root are the train split."""
    if tars.find_shards(raw_root):
        return ("tars", raw_root)
    return ("shards", raw_root) if _shards(raw_root) else None
