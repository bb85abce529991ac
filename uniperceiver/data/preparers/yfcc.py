"""YFCC15M (the CLIP subset of YFCC100M) image-text pairs (pre-training captioning / retrieval).

The official release is a URL list (the yfcc15m metadata); fetch the images with img2dataset and point
--root at its output. Accepted layouts are described in `_pairs.py`:

    <root>/train/00000/000000012.jpg + 000000012.txt   (img2dataset --output_format files)
    <root>/train.tsv  with columns filepath<TAB>caption  (paths relative to the raw root)
    <root>/train.json [{"image": path, "caption": text}]

and the same for a "val" split when present.
"""

from __future__ import annotations

from pathlib import Path

from uniperceiver.data.format import PrepareSummary
from uniperceiver.data.preparers._pairs import prepare_pairs

DESCRIPTION = "YFCC15M (the CLIP subset of YFCC100M) image-text pairs (pre-training)"
LAYOUT = "train/ (img2dataset files output: 00000/*.jpg + *.txt) or train.tsv (filepath<TAB>caption)"
OPTIONS: dict[str, str] = {}


def prepare(
    raw_root: Path, out_dir: Path, *, download: bool = False, progress=None, options: dict | None = None
) -> PrepareSummary:
    return prepare_pairs(
        "yfcc",
        raw_root,
        out_dir,
        download=download,
        progress=progress,
        options=options or {},
        layout=LAYOUT,
        known_options=OPTIONS,
    )
