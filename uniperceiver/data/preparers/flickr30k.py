"""Flickr30k captions with Karpathy's splits (29,000 train / 1,014 val / 1,000 test).

Expected layout under the raw root (the Flickr30k image archive + Karpathy's `caption_datasets.zip`):

    <root>/flickr30k-images/1000092795.jpg ...   (also accepted: flickr30k_images/, images/)
    <root>/dataset_flickr30k.json                (also accepted under annotations/)

`dataset_flickr30k.json` has the same keys as the COCO one minus "filepath" and "cocoid"; the
sample id is the image file name without extension. The images need a signed form, so there is
no `--download`.
"""

from __future__ import annotations

from pathlib import Path

from uniperceiver.data.format import PrepareSummary
from uniperceiver.data.preparers._karpathy import prepare_karpathy

DESCRIPTION = "Flickr30k captions, Karpathy splits (captioning, retrieval)"
LAYOUT = "flickr30k-images/ (the Flickr30k JPEGs) and dataset_flickr30k.json (Karpathy splits)"
OPTIONS = {"restval": "train (default) or skip (Flickr30k has no restval images)"}


def prepare(
    raw_root: Path, out_dir: Path, *, download: bool = False, progress=None, options: dict | None = None
) -> PrepareSummary:
    return prepare_karpathy(
        dataset="flickr30k",
        raw_root=raw_root,
        out_dir=out_dir,
        download=download,
        progress=progress,
        options=options or {},
        layout=LAYOUT,
        json_candidates=["dataset_flickr30k.json", "annotations/dataset_flickr30k.json"],
        image_dirs=["flickr30k-images", "flickr30k_images/flickr30k_images", "flickr30k_images", "images"],
        tasks=["flickr30k-caption", "flickr30k-retrieval"],
        id_key="__stem__",
        downloads=[],
        known_options=OPTIONS,
    )
