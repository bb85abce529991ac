"""Kinetics-400 video classification (cvdfoundation/kinetics-dataset layout); see `_kinetics.py`.

    <root>/annotations/train.csv, val.csv, test.csv   (label,youtube_id,time_start,time_end,split)
    <root>/train/*.mp4, <root>/val/*.mp4, <root>/test/*.mp4   (or videos/<split>/<label>/*.mp4)
    <root>/replacement/replacement_for_corrupted_k400/*.mp4   (optional)

`--download` fetches only the three annotation CSVs from the Kinetics S3 bucket; the 450 GB of
videos come from cvdfoundation's k400_downloader.sh + k400_extractor.sh.
"""

from __future__ import annotations

from pathlib import Path

from uniperceiver.data.download import RemoteFile
from uniperceiver.data.format import PrepareSummary
from uniperceiver.data.preparers._kinetics import prepare_kinetics

DESCRIPTION = "Kinetics-400 video classification"
LAYOUT = "annotations/{train,val,test}.csv and the clips under train/, val/, test/ (cvdfoundation/kinetics-dataset)"
OPTIONS: dict[str, str] = {}
DOWNLOADS = [
    RemoteFile(f"https://s3.amazonaws.com/kinetics/400/annotations/{s}.csv", f"{s}.csv", extract_to="annotations")
    for s in ("train", "val", "test")
]


def prepare(
    raw_root: Path, out_dir: Path, *, download: bool = False, progress=None, options: dict | None = None
) -> PrepareSummary:
    return prepare_kinetics(
        "kinetics400",
        raw_root,
        out_dir,
        download=download,
        progress=progress,
        options=options or {},
        layout=LAYOUT,
        prefix="kinetics400",
        downloads=DOWNLOADS,
        known_options=OPTIONS,
    )
