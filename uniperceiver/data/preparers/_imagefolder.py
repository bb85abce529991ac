"""Class-folder image datasets (ImageNet-1k, ImageNet-21k): class lists, names, synonyms, samples."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from uniperceiver.data.preparers._common import Builder, Skip, walk_files
from uniperceiver.errors import DataError

WNID_RE = re.compile(r"^n\d{8}$")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def wnid_dirs(folder: Path) -> list[str]:
    """Sorted class folder names (WordNet ids like n01440764) directly under `folder`."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and WNID_RE.match(p.name))


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
    """classnames.txt: either one name per line in sorted-wnid order, or 'wnid name' lines."""
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if lines and all(WNID_RE.match(ln.split(None, 1)[0]) for ln in lines):
        return read_synset_words(path)
    if len(lines) != len(wnids):
        raise DataError(
            f"{path}: has {len(lines)} class names but {len(wnids)} classes were found (one name per class, in sorted-wnid order)"
        )
    return {w: [s.strip() for s in ln.split(",") if s.strip()] or [w] for w, ln in zip(wnids, lines)}


def class_names(root: Path, wnids: list[str], candidates: list[str], b: Builder) -> tuple[list[str], list[list[str]]]:
    """(names, synonyms) per wnid from the first names file found; a wnid without one keeps its id."""
    mapping: dict[str, list[str]] = {}
    for rel in candidates:
        p = root / rel
        if p.is_file():
            mapping = read_classnames(p, wnids) if p.name == "classnames.txt" else read_synset_words(p)
            b.source(p)
            break
    synonyms = [mapping.get(w, [w]) for w in wnids]
    return [s[0] for s in synonyms], synonyms


def folder_samples(b: Builder, folder: Path, index: dict[str, int]) -> Iterator[dict | Skip]:
    """One sample per image in `folder/<wnid>/`; unknown class folders are counted, not dropped."""
    for wnid in wnid_dirs(folder):
        for path in walk_files(folder / wnid, IMAGE_SUFFIXES):
            if wnid not in index:
                yield Skip("unknown_label", b.rel(path))
                continue
            yield {"id": path.stem, "media": b.rel(path), "media_type": "image", "label": index[wnid]}
