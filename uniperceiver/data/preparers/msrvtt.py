"""MSR-VTT: 10,000 web clips with 20 captions each; captioning and retrieval splits.

Expected layout under the raw root (Frozen-in-Time's MSRVTT.zip + CLIP4Clip's msrvtt_data.zip):

    <root>/videos/all/video0.mp4 ... video9999.mp4
        (also found: MSRVTT/videos/all/, TrainValVideo/ + TestVideo/ (official), videos/, MSRVTT_Videos/)
    <root>/MSRVTT_data.json  (also in msrvtt_data/, annotation/, annotations/), or the official
        train_val_videodatainfo.json + test_videodatainfo.json:
        {"videos": [{"video_id": "video0", "split": "train"|"validate"|"test", ...}],
         "sentences": [{"video_id": "video0", "caption": "..."}]}
    optional, for the retrieval split "9k / 1k-A":
    <root>/MSRVTT_train.9k.csv        (column video_id)
    <root>/MSRVTT_JSFUSION_test.csv   (columns key,vid_key,video_id,sentence; one caption per video)

Splits: train / val / test = the official captioning split (6,513 / 497 / 2,990) with all 20
captions per clip; train9k (all captions) and test1k (the one JSFUSION caption) when the CSVs exist.
`--download` fetches both zips (6.6 GB of videos).

Training pools (views), flattened to one sample per (video, caption) pair ("<video>#<k>"; the 1%
split draws int(fraction * n_pairs) of them, as msrvtt.py:210-241 does):
- `trainval9k`: the reference's pool, caption_msrvtt_1k_trainval_cocostyle.json (msrvtt.py:171-177),
  which its notebook data/preprocess/msrvtt_dataprocess_1k.ipynb builds from MSRVTT_train.9k.csv
  (9,000 videos, 180,000 pairs); it is disjoint from test1k (the 1k-A test), not from the official
  test split (1,990 of its videos are official test videos);
- `trainval`: the official train + val (7,010 videos), disjoint from the official test split.
"""

from __future__ import annotations

from pathlib import Path

from uniperceiver.data.download import RemoteFile
from uniperceiver.data.format import PrepareSummary
from uniperceiver.data.preparers._common import (
    Builder,
    DatasetSpec,
    Skip,
    find_first,
    need,
    read_json,
    read_table,
    walk_files,
)
from uniperceiver.errors import DataError

SPEC = DatasetSpec(
    "msrvtt",
    "MSR-VTT video captions (captioning; retrieval 9k/1k-A)",
    "videos/all/video*.mp4 and MSRVTT_data.json (+ MSRVTT_train.9k.csv, MSRVTT_JSFUSION_test.csv for retrieval)",
    "video",
    ("msrvtt-caption", "msrvtt-retrieval"),
    "per_item",
    downloads=(
        RemoteFile("https://www.robots.ox.ac.uk/~maxbain/frozen-in-time/data/MSRVTT.zip", "MSRVTT.zip", extract=True),
        RemoteFile("https://github.com/ArrowLuo/CLIP4Clip/releases/download/v0.0/msrvtt_data.zip", "msrvtt_data.zip",
                   extract=True),
    ),
)
LAYOUT = SPEC.layout
#: Where the reference builds its MSR-VTT training pool (fundamentalvision/Uni-Perceiver).
REFERENCE_POOL = ("uniperceiver/datasets/task_dataset/msrvtt.py:171-177, 210-241; "
                  "data/preprocess/msrvtt_dataprocess_1k.ipynb (MSRVTT_train.9k.csv)")
ANN_DIRS = ["", "msrvtt_data/", "annotation/", "annotations/", "MSRVTT/annotation/"]
VIDEO_DIRS = ["videos/all", "MSRVTT/videos/all", "TrainValVideo", "TestVideo", "videos", "MSRVTT_Videos", "all"]
SPLIT_MAP = {"train": "train", "validate": "val", "val": "val", "test": "test"}


def _load_annotations(b: Builder, root: Path) -> tuple[list[dict], dict[str, list[str]]]:
    data_json = find_first(root, [f"{d}MSRVTT_data.json" for d in ANN_DIRS])
    files = [data_json] if data_json else []
    if not files:
        tv = find_first(root, [f"{d}train_val_videodatainfo.json" for d in ANN_DIRS])
        if tv is None:
            raise DataError(f"{root / 'MSRVTT_data.json'}: MSR-VTT annotations not found; expected {LAYOUT}")
        files = [tv]
        test = find_first(root, [f"{d}test_videodatainfo.json" for d in ANN_DIRS])
        if test is not None:
            files.append(test)
    videos: list[dict] = []
    captions: dict[str, list[str]] = {}
    for path in files:
        b.source(path)
        data = read_json(path)
        for i, v in enumerate(need(data, "videos", str(path), list)):
            need(v, "video_id", f"{path}: videos[{i}]", str)
            videos.append(v)
        for i, s in enumerate(need(data, "sentences", str(path), list)):
            vid = need(s, "video_id", f"{path}: sentences[{i}]", str)
            text = str(need(s, "caption", f"{path}: sentences[{i}]")).strip()
            if text:
                captions.setdefault(vid, []).append(text)
    return videos, captions


def _index_videos(b: Builder, root: Path) -> dict[str, str]:
    index: dict[str, str] = {}
    for d in VIDEO_DIRS:
        if (root / d).is_dir():
            for path in walk_files(root / d, (".mp4", ".avi", ".webm", ".mkv")):
                index.setdefault(path.stem, b.rel(path))
    return index


def prepare(
    raw_root: Path, out_dir: Path, *, download: bool = False, progress=None, options: dict | None = None
) -> PrepareSummary:
    b = SPEC.builder(raw_root, out_dir, download=download, progress=progress, options=options)
    videos, captions = _load_annotations(b, raw_root)
    index = _index_videos(b, raw_root)

    def sample(vid: str, texts: list[str]) -> dict | Skip:
        if not texts:
            return Skip("no_caption", vid)
        return {"id": vid, "media": index.get(vid, f"videos/all/{vid}.mp4"), "media_type": "video", "texts": texts}

    per_split: dict[str, list[dict | Skip]] = {"train": [], "val": [], "test": []}
    for i, v in enumerate(videos):
        split = str(v.get("split", ""))
        if split not in SPLIT_MAP:
            raise DataError(
                f"videos[{i}] ({v['video_id']}): unknown split {split!r} (expected train, validate or test)"
            )
        per_split[SPLIT_MAP[split]].append(sample(v["video_id"], captions.get(v["video_id"], [])))
    for split, items in per_split.items():
        if items:
            b.write_split(split, items, media_kind="video", total=len(items))

    train9k = find_first(raw_root, [f"{d}MSRVTT_train.9k.csv" for d in ANN_DIRS])
    if train9k is not None:
        b.source(train9k)
        items = [
            sample(row["video_id"], captions.get(row["video_id"], []))
            for _, row, _ in read_table(train9k, ["video_id"])
        ]
        b.write_split("train9k", items, media_kind="video", total=len(items))
    test1k = find_first(raw_root, [f"{d}MSRVTT_JSFUSION_test.csv" for d in ANN_DIRS])
    if test1k is not None:
        b.source(test1k)
        items = [
            sample(row["video_id"], [row["sentence"].strip()] if row["sentence"].strip() else [])
            for _, row, _ in read_table(test1k, ["video_id", "sentence"])
        ]
        b.write_split("test1k", items, media_kind="video", total=len(items))
    b.add_view("trainval9k", ["train9k"], unit="pair", fewshot_rule="per_pair", reference=REFERENCE_POOL)
    b.add_view("trainval", ["train", "val"], unit="pair", fewshot_rule="per_pair", reference=REFERENCE_POOL)
    return b.finish()
