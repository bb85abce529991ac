"""Karpathy-split caption datasets (COCO 2014, Flickr30k): shared reader.

The Karpathy JSON (`dataset_coco.json`, `dataset_flickr30k.json`, from `caption_datasets.zip`) is
{"images": [{"filename", "filepath" (COCO only), "split": train|restval|val|test, "imgid",
"cocoid" (COCO only), "sentences": [{"raw", "tokens", ...}]}]}. One sample per image with all its
captions ("texts"), so retrieval sees every caption and captioning every reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from uniperceiver.data.format import PrepareSummary
from uniperceiver.data.preparers._common import Builder, Skip, need, read_json, require_file, require_root
from uniperceiver.errors import DataError

SPLIT_MAP = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def prepare_karpathy(
    *,
    dataset: str,
    raw_root: Path,
    out_dir: Path,
    download: bool,
    progress,
    options: dict,
    layout: str,
    json_candidates: list[str],
    image_dirs: list[str],
    tasks: list[str],
    id_key: str,
    downloads: list,
    known_options: dict[str, str],
) -> PrepareSummary:
    b = Builder(
        dataset,
        raw_root,
        out_dir,
        options=options,
        progress=progress,
        known_options=known_options,
        media_type="image",
        tasks=tasks,
        fewshot_rule="per_image",
        layout=layout,
    )
    restval = b.options.choice("restval", ("train", "skip"), "train")
    if download and not downloads:
        b.fetch(downloads, download)  # a clear "no public URL" error, before anything else
    if not download:
        require_root(raw_root, dataset, layout)
    raw_root.mkdir(parents=True, exist_ok=True)
    ann = require_file(raw_root, json_candidates, f"Karpathy split file ({layout})")
    b.fetch(downloads, download)
    data = read_json(ann)
    b.source(ann)
    images = need(data, "images", str(ann), list)

    base = _image_base(raw_root, images, image_dirs)

    per_split: dict[str, list[dict | Skip]] = {"train": [], "val": [], "test": []}
    for i, img in enumerate(images):
        where = f"{ann}: images[{i}]"
        filename = need(img, "filename", where, str)
        split = need(img, "split", where, str)
        if split not in SPLIT_MAP:
            raise DataError(f"{where}: unknown split {split!r} (expected train, restval, val or test)")
        if split == "restval" and restval == "skip":
            continue
        target = SPLIT_MAP[split]
        sid = Path(filename).stem if id_key == "__stem__" else need(img, id_key, where)
        parts = [p for p in (base, img.get("filepath", ""), filename) if p]
        texts = [str(s.get("raw", "")).strip() for s in need(img, "sentences", where, list)]
        texts = [t for t in texts if t]
        if not texts:
            per_split[target].append(Skip("no_caption", filename))
            continue
        sample: dict[str, Any] = {"id": str(sid), "media": "/".join(parts), "media_type": "image", "texts": texts}
        per_split[target].append(sample)
    for split, items in per_split.items():
        if items:
            b.write_split(split, items, media_kind="image", total=len(items))
    return b.finish(extra={"caption_source": "karpathy"})


def _image_base(raw_root: Path, images: list, image_dirs: list[str]) -> str:
    """The folder (relative to raw_root) that holds `filepath/filename`: probed on the first images."""
    probe = [img for img in images[:50] if isinstance(img, dict) and isinstance(img.get("filename"), str)]
    for base in [*image_dirs, ""]:
        for img in probe:
            parts = [p for p in (base, img.get("filepath", ""), img["filename"]) if p]
            if (raw_root / "/".join(parts)).is_file():
                return base
    for base in image_dirs:
        if (raw_root / base).is_dir():
            return base
    return ""
