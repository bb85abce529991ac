"""COCO 2014 captions with Karpathy's splits (113,287 train incl. restval / 5,000 val / 5,000 test).

Expected layout under the raw root (the official COCO download + Karpathy's `caption_datasets.zip`):

    <root>/train2014/COCO_train2014_000000000009.jpg ...
    <root>/val2014/COCO_val2014_000000000042.jpg ...
    <root>/dataset_coco.json          (also accepted: annotations/ or new_annotations/dataset_coco.json)

The images may also sit under `<root>/images/` or `<root>/coco_origin/` (the reference layout).
`dataset_coco.json` entries carry "filepath" (train2014 / val2014), "filename", "split"
(train / restval / val / test), "cocoid" and "sentences" [{"raw", "tokens"}]. Each image becomes
one sample {"id": cocoid, "media", "texts": [5 raw captions]}; "restval" goes to train
(option restval=skip drops it). `--download` fetches the two image zips from images.cocodataset.org;
Karpathy's JSON has no stable URL and must be put in place by hand.
"""

from __future__ import annotations

from pathlib import Path

from uniperceiver.data.download import RemoteFile
from uniperceiver.data.format import PrepareSummary
from uniperceiver.data.preparers._karpathy import prepare_karpathy

DESCRIPTION = "COCO 2014 captions, Karpathy splits (captioning, retrieval)"
LAYOUT = "train2014/, val2014/ (COCO 2014 images) and dataset_coco.json (Karpathy splits)"
OPTIONS = {"restval": "train (default: restval images join train, 113k) or skip"}
DOWNLOADS = [
    RemoteFile("http://images.cocodataset.org/zips/train2014.zip", "train2014.zip", extract=True),
    RemoteFile("http://images.cocodataset.org/zips/val2014.zip", "val2014.zip", extract=True),
]


def prepare(
    raw_root: Path, out_dir: Path, *, download: bool = False, progress=None, options: dict | None = None
) -> PrepareSummary:
    return prepare_karpathy(
        dataset="coco",
        raw_root=raw_root,
        out_dir=out_dir,
        download=download,
        progress=progress,
        options=options or {},
        layout=LAYOUT,
        json_candidates=["dataset_coco.json", "annotations/dataset_coco.json", "new_annotations/dataset_coco.json"],
        image_dirs=["images", "coco_origin"],
        tasks=["coco-caption", "coco-retrieval", "coco-pt-caption", "coco-pt-retrieval"],
        id_key="cocoid",
        downloads=DOWNLOADS,
        known_options=OPTIONS,
    )
