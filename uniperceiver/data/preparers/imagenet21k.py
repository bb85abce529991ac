"""ImageNet-21k (fall 2011 / winter 2021 release) classification with class synonyms.

Accepted layouts under the raw root:

    <root>/n00004475/n00004475_15899.JPEG ...        (the release's per-synset tars, extracted)
    <root>/train/<wnid>/*.JPEG, <root>/val/<wnid>/*   (any train/val split, e.g. ImageNet-21K-P's
                                                       imagenet21k_train/ and imagenet21k_val/)

Class names and synonyms from `words.txt` (ImageNet's "n00001740<TAB>entity"), or
`LOC_synset_mapping.txt`-style "wnid syn, syn" lines, or `classnames.txt`; every synonym is kept
in targets.synonyms (pre-training samples one synonym per class per batch). Classes are the
sorted wnids found on disk. Without a train/val split all images go to "train".
"""

from __future__ import annotations

from pathlib import Path

from uniperceiver.data.format import PrepareSummary
from uniperceiver.data.preparers._common import Builder, require_root
from uniperceiver.data.preparers._imagefolder import class_names, folder_samples, wnid_dirs
from uniperceiver.errors import DataError

DESCRIPTION = "ImageNet-21k image classification with synonyms (pre-training)"
LAYOUT = "<wnid>/*.JPEG class folders (or train/ and val/ holding them) and words.txt (synset names)"
OPTIONS: dict[str, str] = {}
NAME_FILES = ["words.txt", "classnames.txt", "LOC_synset_mapping.txt", "synset_words.txt"]
SPLIT_DIRS = {"train": ["train", "imagenet21k_train"], "val": ["val", "imagenet21k_val"]}


def prepare(
    raw_root: Path, out_dir: Path, *, download: bool = False, progress=None, options: dict | None = None
) -> PrepareSummary:
    b = Builder(
        "imagenet21k",
        raw_root,
        out_dir,
        options=options,
        progress=progress,
        known_options=OPTIONS,
        media_type="image",
        tasks=["imagenet21k"],
        fewshot_rule="per_class",
        layout=LAYOUT,
    )
    b.fetch([], download)
    require_root(raw_root, "imagenet21k", LAYOUT)
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
    wnids = sorted(set().union(*(wnid_dirs(f) for f in folders.values())))
    names, synonyms = class_names(raw_root, wnids, NAME_FILES, b)
    index = {w: i for i, w in enumerate(wnids)}
    for split, folder in folders.items():
        b.source(folder)
        b.write_split(split, folder_samples(b, folder, index), media_kind="image")
    return b.finish(targets={"classes": names, "wnids": wnids, "synonyms": synonyms})
