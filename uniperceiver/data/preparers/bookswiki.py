"""Books + Wikipedia text corpus for masked language modelling, indexed but never loaded whole.

Expected layout: a folder of UTF-8 text files, one sentence or paragraph per line, any depth:

    <root>/bookswiki.doc                 (the reference: `cat wiki.doc bc1g.doc > bookswiki.doc`)
    <root>/wiki/AA/wiki_00.txt, <root>/books/*.txt ...   (or many smaller files)

Files ending in .txt or .doc are read. The manifest has one line per file,
{"id", "text_file", "lines": non-blank lines}; `uniperceiver.data.format.iter_corpus_lines`
streams the lines back (and can start at any line). Files that are not UTF-8 are counted as
"unreadable_text", empty ones as "empty_text". Option val_files=N moves the last N files
(sorted by path) to a "val" split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from uniperceiver.data.format import PrepareSummary
from uniperceiver.data.preparers._common import Builder, DatasetSpec, Skip, walk_files
from uniperceiver.errors import DataError

SPEC = DatasetSpec(
    "bookswiki",
    "Books + Wikipedia plain text (MLM pre-training; streamed)",
    "UTF-8 text files (*.txt or *.doc, one sentence per line), e.g. bookswiki.doc",
    "text",
    ("bookswiki-mlm",),
    "per_item",
    options={"val_files": "number of files (the last ones, sorted by path) kept apart as the val split (default 0)"},
)
LAYOUT = SPEC.layout


def count_lines(path: Path) -> int:
    """Non-blank lines, counted the way iter_corpus_lines reads them (lines end at "\n", str.strip)."""
    n = 0
    with open(path, "r", encoding="utf-8", newline="\n") as fh:
        for line in fh:
            if line.strip():
                n += 1
    return n


def _samples(b: Builder, files: list[Path]) -> Iterator[dict | Skip]:
    for path in files:
        rel = b.rel(path)
        try:
            n = count_lines(path)
        except UnicodeDecodeError:
            yield Skip("unreadable_text", rel)
            continue
        except OSError:
            yield Skip("unreadable_text", rel)
            continue
        if n == 0:
            yield Skip("empty_text", rel)
            continue
        yield {"id": rel, "text_file": rel, "lines": n}


def prepare(
    raw_root: Path, out_dir: Path, *, download: bool = False, progress=None, options: dict | None = None
) -> PrepareSummary:
    b = SPEC.builder(raw_root, out_dir, download=download, progress=progress, options=options)
    val_files = b.options.int("val_files", 0, minimum=0)
    files = [p for p in walk_files(raw_root, (".txt", ".doc")) if ".upctl" not in p.parts]
    if not files:
        raise DataError(f"{raw_root}: no .txt or .doc files found; expected {LAYOUT}")
    if val_files >= len(files):
        raise DataError(f"option val_files={val_files}: only {len(files)} files found, at least one must stay in train")
    b.source(raw_root)
    cut = len(files) - val_files
    b.write_split("train", _samples(b, files[:cut]), media_kind=None, total=cut)
    if val_files:
        b.write_split("val", _samples(b, files[cut:]), media_kind=None, total=val_files)
    return b.finish(extra={"corpus": True})
