"""Class-folder datasets: class lists, names, synonyms, samples.

ImageNet-1k / -21k name their folders by WordNet id (`wnid_dirs`); a user's folder (`upctl prepare
imagefolder`) names them freely (`class_dirs`); both are read by `folder_samples`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterator

from uniperceiver.data.preparers._common import Builder, Skip, walk_files
from uniperceiver.errors import DataError

WNID_RE = re.compile(r"^n\d{8}$")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def class_dirs(folder: Path, pattern: re.Pattern[str] | None = None) -> list[str]:
    """Sorted names of the (non-hidden) class folders directly under `folder`, those matching `pattern`."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (pattern is None or pattern.match(p.name)))


def wnid_dirs(folder: Path) -> list[str]:
    """Sorted class folder names (WordNet ids like n01440764) directly under `folder`."""
    return class_dirs(folder, WNID_RE)


def read_synset_words(path: Path) -> dict[str, list[str]]:
    """`n01440764 tench, Tinca tinca` (space or tab after the id) -> {wnid: [synonyms...]}.

    The format of LOC_synset_mapping.txt (Kaggle), synset_words.txt (Caffe) and words.txt (ImageNet).
    """
    out: dict[str, list[str]] = {}
    with open(path, "r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(None, 1)
            if not WNID_RE.match(parts[0]):
                raise DataError(f"{path}:{lineno}: expected 'n01440764 name, synonym, ...', got {line[:80]!r}")
            syn = [s.strip() for s in parts[1].split(",")] if len(parts) > 1 else []
            out[parts[0]] = [s for s in syn if s] or [parts[0]]
    return out


def read_classnames(path: Path, wnids: list[str]) -> dict[str, list[str]]:
    """classnames.txt: either one name per line in class order (`wnids`), or 'wnid name' lines."""
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if lines and all(WNID_RE.match(ln.split(None, 1)[0]) for ln in lines):
        return read_synset_words(path)
    if len(lines) != len(wnids):
        raise DataError(
            f"{path}: has {len(lines)} class names but {len(wnids)} classes were found "
            "(one name per class in class order, or 'wnid name' lines)"
        )
    return {w: [s.strip() for s in ln.split(",") if s.strip()] or [w] for w, ln in zip(wnids, lines)}


#: Files of WordNet names ("wnid name, synonym, ..."), first found wins: ImageNet's words.txt,
#: Kaggle's LOC_synset_mapping.txt, Caffe's synset_words.txt.
SYNSET_FILES = ["words.txt", "LOC_synset_mapping.txt", "synset_words.txt", "meta/synset_words.txt"]


def class_names(root: Path, wnids: list[str], b: Builder) -> tuple[list[str], list[list[str]]]:
    """(names, synonyms) per wnid, the reference's way (uniperceiver/data/imagenet_classes.py):

    1. `classnames.txt` in the raw root: the user's override, for every class it names;
    2. an ImageNet-1k class: its imagenet-simple-labels name (one name, no synonyms);
    3. the WordNet synonyms of the first synset file found (SYNSET_FILES), else timm's WordNet
       lemmas, else the wnid itself.
    """
    from uniperceiver.data.imagenet_classes import imagenet1k_names, wordnet_synonyms

    override: dict[str, list[str]] = {}
    if (root / "classnames.txt").is_file():
        override = read_classnames(root / "classnames.txt", wnids)
        b.source(root / "classnames.txt")
    wordnet: dict[str, list[str]] = {}
    for rel in SYNSET_FILES:
        if (root / rel).is_file():
            wordnet = read_synset_words(root / rel)
            b.source(root / rel)
            break
    simple = imagenet1k_names()
    synonyms = []
    for w in wnids:
        if w in override:
            synonyms.append(override[w])
        elif w in simple:
            synonyms.append([simple[w]])
        else:
            synonyms.append(wordnet.get(w) or wordnet_synonyms(w) or [w])
    return [s[0] for s in synonyms], synonyms


def folder_samples(
    b: Builder,
    folder: Path,
    index: dict[str, int],
    *,
    dirs: Callable[[Path], list[str]] = wnid_dirs,
    suffixes: tuple[str, ...] = IMAGE_SUFFIXES,
    media_type: str = "image",
    sample_id: Callable[[Path], str] = lambda path: path.stem,
) -> Iterator[dict | Skip]:
    """One sample per file in `folder/<class>/`; unknown class folders are counted, not dropped.

    ImageNet ids are file stems (unique there); a user's folders may repeat a file name in every
    class, so they pass a `sample_id` that keeps the class folder.
    """
    for name in dirs(folder):
        for path in walk_files(folder / name, suffixes):
            if name not in index:
                yield Skip("unknown_label", b.rel(path))
                continue
            yield {"id": sample_id(path), "media": b.rel(path), "media_type": media_type, "label": index[name]}
