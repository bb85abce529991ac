"""Kinetics-700 (2020) video classification (cvdfoundation/kinetics-dataset layout); see `_kinetics.py`.

    <root>/annotations/train.csv, val.csv (validate.csv), test.csv
    <root>/train/*.mp4, <root>/val/*.mp4 (or videos/<split>/<label>/*.mp4)

Videos and annotations come from cvdfoundation's k700_2020_downloader.sh; no --download here.
"""

from __future__ import annotations

from pathlib import Path

from uniperceiver.data.format import PrepareSummary
from uniperceiver.data.preparers._kinetics import prepare_kinetics

DESCRIPTION = "Kinetics-700 video classification (pre-training)"
LAYOUT = "annotations/{train,val,test}.csv and the clips under train/, val/ (cvdfoundation/kinetics-dataset, k700-2020)"
OPTIONS: dict[str, str] = {}


def prepare(
    raw_root: Path, out_dir: Path, *, download: bool = False, progress=None, options: dict | None = None
) -> PrepareSummary:
    return prepare_kinetics(
        "kinetics700",
        raw_root,
        out_dir,
        download=download,
        progress=progress,
        options=options or {},
        layout=LAYOUT,
        prefix="kinetics700",
        downloads=[],
        known_options=OPTIONS,
    )
