"""ImageNet-21k (fall 2011 / winter 2021 release) classification with class synonyms.

Accepted layouts under the raw root:

    <root>/n00004475/n00004475_15899.JPEG ...        (the release's per-synset tars, extracted)
    <root>/train/<wnid>/*.JPEG, <root>/val/<wnid>/*   (any train/val split, e.g. ImageNet-21K-P's
                                                       imagenet21k_train/ and imagenet21k_val/)

Classes are the wnids found on disk in the reference's order: the ImageNet-1k classes first (in
1k order), then the others sorted. Their names follow the reference's target set
(tools/generate_target_sets.ipynb, "ImageNet 22k class names": "the ImageNet 1k class names as
the first 1000 categories, and the WordNet synonyms for the remaining categories"): an ImageNet-1k
class has its imagenet-simple-labels name as its only synonym; the others every synonym of
`words.txt` (ImageNet's "n00001740<TAB>entity"; or `LOC_synset_mapping.txt`-style "wnid syn, syn"
lines), else WordNet's (timm). `classnames.txt` overrides both. targets.synonyms keeps them all
(pre-training samples one synonym per class per batch). Without a train/val split all images go
to "train".
"""

from __future__ import annotations

from pathlib import Path

from uniperceiver.data.format import PrepareSummary
from uniperceiver.data.imagenet_classes import imagenet21k_order
from uniperceiver.data.preparers._common import DatasetSpec
from uniperceiver.data.preparers._imagefolder import class_names, folder_samples, wnid_dirs
from uniperceiver.errors import DataError

SPEC = DatasetSpec(
    "imagenet21k",
    "ImageNet-21k image classification with synonyms (pre-training)",
    "<wnid>/*.JPEG class folders (or train/ and val/ holding them) and words.txt (synset names)",
    "image",
    ("imagenet21k",),
    "per_class",
)
LAYOUT = SPEC.layout
SPLIT_DIRS = {"train": ["train", "imagenet21k_train"], "val": ["val", "imagenet21k_val"]}


def prepare(
    raw_root: Path, out_dir: Path, *, download: bool = False, progress=None, options: dict | None = None
) -> PrepareSummary:
    b = SPEC.builder(raw_root, out_dir, download=download, progress=progress, options=options)
    folders: dict[str, Path] = {}
    for split, cands in SPLIT_DIRS.items():
        for c in cands:
            if wnid_dirs(raw_root / c):
                folders[split] = raw_root / c
                break
    if not folders:
        if not wnid_dirs(raw_root):
            raise DataError(f"{raw_root}: no class folders (n00004475/ ...) found; expected {LAYOUT}")
        folders["train"] = raw_root
    wnids = imagenet21k_order(sorted(set().union(*(wnid_dirs(f) for f in folders.values()))))
    names, synonyms = class_names(raw_root, wnids, b)
    index = {w: i for i, w in enumerate(wnids)}
    for split, folder in folders.items():
        b.source(folder)
        b.write_split(split, folder_samples(b, folder, index), media_kind="image")
    return b.finish(targets={"classes": names, "wnids": wnids, "synonyms": synonyms})
