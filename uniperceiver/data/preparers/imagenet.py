"""ImageNet-1k (ILSVRC-2012) classification: train (1.28M) and val (50,000).

Accepted layouts under the raw root:

1. Class folders (torchvision ImageFolder, or val re-sorted by `valprep.sh`):
       <root>/train/n01440764/n01440764_10026.JPEG ...
       <root>/val/n01440764/ILSVRC2012_val_00000293.JPEG ...
2. Kaggle "ImageNet Object Localization Challenge":
       <root>/ILSVRC/Data/CLS-LOC/train/<wnid>/*.JPEG, <root>/ILSVRC/Data/CLS-LOC/val/*.JPEG (flat)
       <root>/LOC_val_solution.csv   (ImageId,PredictionString: "n01751748 x y x y ...")
       <root>/LOC_synset_mapping.txt ("n01440764 tench, Tinca tinca")
3. Official tarballs with a flat val folder and the devkit:
       <root>/val/ILSVRC2012_val_00000001.JPEG ...
       <root>/ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt + meta.mat (needs scipy)
   or, instead of the devkit, a Caffe/reference `val.txt` (also meta/val.txt): "ILSVRC2012_val_00000001.JPEG 65",
   the label being the index in sorted-wnid order.

Class order is the sorted WordNet ids (the universal convention; class i of a full layout is
timm's ImageNet-1k synset i). Class names are the reference's zero-shot / prompt-tuning targets,
imagenet-simple-labels (uniperceiver/data/imagenet_classes.py), looked up by wnid so a partial
layout (a subset of the class folders) keeps each class's own name; `classnames.txt` (one name per
line in sorted-wnid order, or "wnid name" lines) overrides them, and a wnid outside ImageNet-1k
takes the first synonym of LOC_synset_mapping.txt / synset_words.txt, else WordNet's (timm).
The 1% split draws int(0.01 * n_c) + 1 images per class (imagenet.py:128-144). There is no
--download (ImageNet needs an account).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from uniperceiver.data.format import PrepareSummary
from uniperceiver.data.preparers._common import Builder, DatasetSpec, Skip, find_first, read_table, walk_files
from uniperceiver.data.preparers._imagefolder import (
    IMAGE_SUFFIXES,
    WNID_RE,
    class_names,
    folder_samples,
    read_synset_words,
    wnid_dirs,
)
from uniperceiver.errors import DataError

SPEC = DatasetSpec(
    "imagenet",
    "ImageNet-1k (ILSVRC-2012) image classification",
    "train/<wnid>/*.JPEG and val/ (class folders, or flat with LOC_val_solution.csv or the devkit ground truth)",
    "image",
    ("imagenet",),
    "per_class",
)
LAYOUT = SPEC.layout


def _base(root: Path) -> Path:
    kaggle = root / "ILSVRC" / "Data" / "CLS-LOC"
    return kaggle if kaggle.is_dir() else root


def _devkit_labels(root: Path) -> dict[str, str] | None:
    """val image stem -> wnid from the devkit ground truth + meta.mat, or None if absent."""
    gt = find_first(
        root,
        ["ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", "ILSVRC2012_validation_ground_truth.txt"],
    )
    if gt is None:
        return None
    meta = gt.parent / "meta.mat"
    if not meta.is_file():
        raise DataError(f"{meta}: the devkit's meta.mat is needed to map {gt.name} ids to WordNet ids")
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError(
            f"{meta}: reading the devkit needs scipy (pip install scipy), or use LOC_val_solution.csv"
        ) from None
    synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
    id2wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    out = {}
    for i, line in enumerate(gt.read_text().split(), 1):
        try:
            out[f"ILSVRC2012_val_{i:08d}"] = id2wnid[int(line)]
        except (KeyError, ValueError):
            raise DataError(f"{gt}:{i}: {line!r} is not an ILSVRC2012_ID of meta.mat") from None
    return out


def _val_labels(root: Path, b: Builder, wnids: list[str]) -> dict[str, str]:
    """Labels (stem -> wnid) for a flat val folder, from the first labels file found."""
    sol = find_first(root, ["LOC_val_solution.csv"])
    if sol is not None:
        b.source(sol)
        out = {}
        for lineno, row, _ in read_table(sol, ["ImageId", "PredictionString"]):
            pred = row["PredictionString"].split()
            if not pred or not WNID_RE.match(pred[0]):
                raise DataError(
                    f"{sol}:{lineno}: PredictionString should start with a wnid, got {row['PredictionString'][:40]!r}"
                )
            out[row["ImageId"]] = pred[0]
        return out
    dev = _devkit_labels(root)
    if dev is not None:
        b.source(root / "ILSVRC2012_devkit_t12")
        return dev
    txt = find_first(root, ["val.txt", "meta/val.txt"])
    if txt is not None:
        b.source(txt)
        out = {}
        for lineno, line in enumerate(txt.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                out[Path(parts[0]).stem] = wnids[int(parts[1])]
            except (IndexError, ValueError):
                raise DataError(
                    f"{txt}:{lineno}: expected 'ILSVRC2012_val_00000001.JPEG <class index 0..{len(wnids) - 1}>', got {line[:80]!r}"
                ) from None
        return out
    raise DataError(
        f"{root}: val/ is flat but no labels file was found: put LOC_val_solution.csv (Kaggle), "
        "ILSVRC2012_devkit_t12/ (official devkit) or val.txt ('<file> <index>') in the raw root"
    )


def _flat_val(b: Builder, folder: Path, labels: dict[str, str], index: dict[str, int]) -> Iterator[dict | Skip]:
    for path in walk_files(folder, IMAGE_SUFFIXES):
        wnid = labels.get(path.stem)
        if wnid is None or wnid not in index:
            yield Skip("unknown_label", b.rel(path))
            continue
        yield {"id": path.stem, "media": b.rel(path), "media_type": "image", "label": index[wnid]}


def prepare(
    raw_root: Path, out_dir: Path, *, download: bool = False, progress=None, options: dict | None = None
) -> PrepareSummary:
    b = SPEC.builder(raw_root, out_dir, download=download, progress=progress, options=options)
    base = _base(raw_root)
    train, val = base / "train", base / "val"
    wnids = wnid_dirs(train) or wnid_dirs(val)
    if not wnids:
        mapping = find_first(raw_root, ["LOC_synset_mapping.txt", "synset_words.txt"])
        wnids = sorted(read_synset_words(mapping)) if mapping else []
    if not wnids:
        raise DataError(f"{train}: no class folders (n01440764/ ...) found; expected {LAYOUT}")
    names, _synonyms = class_names(raw_root, wnids, b)
    index = {w: i for i, w in enumerate(wnids)}
    if train.is_dir():
        b.source(train)
        b.write_split("train", folder_samples(b, train, index), media_kind="image")
    if val.is_dir():
        b.source(val)
        if wnid_dirs(val):
            items = folder_samples(b, val, index)
        else:
            items = _flat_val(b, val, _val_labels(raw_root, b, wnids), index)
        b.write_split("val", items, media_kind="image")
    # no "synonyms" here: ImageNet-1k trains and evaluates on one fixed name per class; WordNet's
    # other lemmas ("Tinca tinca") would be sampled as class names by the classification task
    return b.finish(targets={"classes": names, "wnids": wnids})
