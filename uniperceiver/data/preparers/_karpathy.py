"""Karpathy-split caption datasets: COCO 2014 and Flickr30k (captioning, retrieval).

COCO (113,287 train incl. restval / 5,000 val / 5,000 test), under the raw root (the official
COCO download + Karpathy's `caption_datasets.zip`):

    <root>/train2014/COCO_train2014_000000000009.jpg ...   (also under images/ or coco_origin/)
    <root>/val2014/COCO_val2014_000000000042.jpg ...
    <root>/dataset_coco.json          (also accepted: annotations/ or new_annotations/dataset_coco.json)

Flickr30k (29,000 train / 1,014 val / 1,000 test):

    <root>/flickr30k-images/1000092795.jpg ...   (also accepted: flickr30k_images/, images/)
    <root>/dataset_flickr30k.json                (also accepted under annotations/)

The Karpathy JSON is {"images": [{"filename", "filepath" (COCO only), "split": train|restval|val|test,
"imgid", "cocoid" (COCO only), "sentences": [{"raw", "tokens", ...}]}]}. One sample per image with
all its captions ("texts"), so retrieval sees every caption and captioning every reference; the
id is the cocoid (COCO) or the file name without extension (Flickr30k). "restval" goes to train
(option restval=skip drops it).

The view `trainval` (train + val) is the reference's training pool for captioning and retrieval,
fine-tuning and 1% prompt tuning alike: image_text_pair.py:207-219 reads captions_train113k +
captions_val5k (COCO) and all_data_final_train + all_data_final_val_set0 (Flickr30k), and
:345-346 draws int(fraction * n) whole images from that pool.

`--download` fetches COCO's two image zips from images.cocodataset.org; Karpathy's JSON has no
stable URL and must be put in place by hand (checked before any download). Flickr30k's images
need a signed form, so it has no `--download`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniperceiver.data.download import RemoteFile
from uniperceiver.data.format import PrepareSummary
from uniperceiver.data.preparers._common import DatasetSpec, Skip, need, read_json, require_file
from uniperceiver.errors import DataError

SPLIT_MAP = {"train": "train", "restval": "train", "val": "val", "test": "test"}
REFERENCE_POOL = "fundamentalvision/Uni-Perceiver uniperceiver/datasets/task_dataset/image_text_pair.py:207-219, 326-346"


@dataclass(frozen=True)
class KarpathySet:
    """One Karpathy-split dataset: its declaration and where its files are."""

    spec: DatasetSpec
    json_candidates: tuple[str, ...]
    image_dirs: tuple[str, ...]
    id_key: str  # key of the image id in the JSON, or "__stem__": the file name without extension


_COCO_ZIPS = ("train2014", "val2014")
SETS: dict[str, KarpathySet] = {
    "coco": KarpathySet(
        DatasetSpec(
            "coco", "COCO 2014 captions, Karpathy splits (captioning, retrieval)",
            "train2014/, val2014/ (COCO 2014 images) and dataset_coco.json (Karpathy splits)", "image",
            ("coco-caption", "coco-retrieval", "coco-pt-caption", "coco-pt-retrieval"), "per_image",
            options={"restval": "train (default: restval images join train, 113k) or skip"},
            downloads=tuple(RemoteFile(f"http://images.cocodataset.org/zips/{z}.zip", f"{z}.zip", extract=True)
                            for z in _COCO_ZIPS),
        ),
        ("dataset_coco.json", "annotations/dataset_coco.json", "new_annotations/dataset_coco.json"),
        ("images", "coco_origin"),
        "cocoid",
    ),
    "flickr30k": KarpathySet(
        DatasetSpec(
            "flickr30k", "Flickr30k captions, Karpathy splits (captioning, retrieval)",
            "flickr30k-images/ (the Flickr30k JPEGs) and dataset_flickr30k.json (Karpathy splits)", "image",
            ("flickr30k-caption", "flickr30k-retrieval"), "per_image",
            options={"restval": "train (default) or skip (Flickr30k has no restval images)"},
        ),
        ("dataset_flickr30k.json", "annotations/dataset_flickr30k.json"),
        ("flickr30k-images", "flickr30k_images/flickr30k_images", "flickr30k_images", "images"),
        "__stem__",
    ),
}


def prepare(
    variant: str, raw_root: Path, out_dir: Path, *, download: bool = False, progress=None, options: dict | None = None
) -> PrepareSummary:
    """Prepare `variant` (coco or flickr30k): train / val / test manifests and the `trainval` view."""
    kset = SETS[variant]
    spec = kset.spec
    b = spec.builder(raw_root, out_dir, download=download, progress=progress, options=options, fetch=False)
    restval = b.options.choice("restval", ("train", "skip"), "train")
    if download and not spec.downloads:
        b.fetch([], download)  # a clear "no public URL" error, before anything else
    raw_root.mkdir(parents=True, exist_ok=True)
    # the hand-placed Karpathy JSON first: no 19 GB download that would end in "file not found"
    ann = require_file(raw_root, list(kset.json_candidates), f"Karpathy split file ({spec.layout})")
    b.fetch(list(spec.downloads), download)
    data = read_json(ann)
    b.source(ann)
    images = need(data, "images", str(ann), list)
    base = _image_base(raw_root, images, kset.image_dirs)
    per_split: dict[str, list[dict | Skip]] = {"train": [], "val": [], "test": []}
    for i, img in enumerate(images):
        where = f"{ann}: images[{i}]"
        filename = need(img, "filename", where, str)
        split = need(img, "split", where, str)
        if split not in SPLIT_MAP:
            raise DataError(f"{where}: unknown split {split!r} (expected train, restval, val or test)")
        if split == "restval" and restval == "skip":
            continue
        sid = Path(filename).stem if kset.id_key == "__stem__" else need(img, kset.id_key, where)
        parts = [p for p in (base, img.get("filepath", ""), filename) if p]
        texts = [str(s.get("raw", "")).strip() for s in need(img, "sentences", where, list)]
        texts = [t for t in texts if t]
        if not texts:
            per_split[SPLIT_MAP[split]].append(Skip("no_caption", filename))
            continue
        sample: dict[str, Any] = {"id": str(sid), "media": "/".join(parts), "media_type": "image", "texts": texts}
        per_split[SPLIT_MAP[split]].append(sample)
    for split, items in per_split.items():
        if items:
            b.write_split(split, items, media_kind="image", total=len(items))
    b.add_view("trainval", ["train", "val"], fewshot_rule="per_image", reference=REFERENCE_POOL)
    return b.finish(extra={"caption_source": "karpathy"})


def _image_base(raw_root: Path, images: list, image_dirs: tuple[str, ...]) -> str:
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
