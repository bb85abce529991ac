"""MSVD (Microsoft Video Description, "YouTube2Text"): 1,970 clips, ~40 English captions each.

Expected layout under the raw root:

    <root>/YouTubeClips/-4wsuPCjDBc_5_15.avi ...     (the official YouTubeClips.tar, extracted)

plus ONE of these caption annotations:

  a) the reference's preprocessed `txt_labels/` (nasib-ullah/video-captioning-models-in-Pytorch):
         txt_labels/sents_{train,val,test}_lc_nopunc.txt   "vid1<TAB>a squirrel is eating a peanut"
         txt_labels/youtube_mapping.txt                    "-4wsuPCjDBc_5_15 vid1"
     the split is the one of these files (1,200 / 100 / 670);
  b) the official `AllVideoDescriptions.txt` ("-4wsuPCjDBc_5_15 a squirrel is eating a peanut",
     "#" comment lines), with the standard split
       - by `youtube_mapping.txt` (in the root or txt_labels/) when present: vid1-1200 train,
         vid1201-1300 val, vid1301-1970 test (Venugopalan et al.);
       - otherwise by the sorted list of captioned clip names: first 1,200 train, next 100 val,
         last 670 test (option split_sizes=1200,100,670 changes the sizes).

One sample per clip with all its captions ("texts"). `--download` fetches YouTubeClips.tar and
AllVideoDescriptions.txt from the dataset's UT Austin page.

The view `trainval` is the reference's training pool: train + val flattened to one sample per
(clip, caption) pair ("<clip>#<k>"), for fine-tuning and for the 1% split, which draws
int(fraction * n_pairs) pairs uniformly (msvd.py:168-170 reads the train and val annotation
files, :206-237 flattens them and draws with random.sample).
"""

from __future__ import annotations

from pathlib import Path

from uniperceiver.data.download import RemoteFile
from uniperceiver.data.format import PrepareSummary
from uniperceiver.data.preparers._common import Builder, DatasetSpec, Skip, find_first
from uniperceiver.errors import ConfigError, DataError

_BASE = "https://www.cs.utexas.edu/users/ml/clamp/videoDescription"
SPEC = DatasetSpec(
    "msvd",
    "MSVD video captions (captioning, retrieval)",
    "YouTubeClips/*.avi and AllVideoDescriptions.txt (or the txt_labels/ folder of the reference)",
    "video",
    ("msvd-caption", "msvd-retrieval"),
    "per_item",
    options={"split_sizes": "train,val,test clip counts of the standard split (default 1200,100,670)"},
    downloads=(
        RemoteFile(f"{_BASE}/YouTubeClips.tar", "YouTubeClips.tar", extract=True),
        RemoteFile(f"{_BASE}/AllVideoDescriptions.txt", "AllVideoDescriptions.txt"),
    ),
)
LAYOUT = SPEC.layout
SPLITS = ("train", "val", "test")
#: Where the reference builds its MSVD training pool (fundamentalvision/Uni-Perceiver).
REFERENCE_POOL = "uniperceiver/datasets/task_dataset/msvd.py:168-170, 206-237"


def _mapping(path: Path) -> dict[str, str]:
    """youtube_mapping.txt: 'clip vidN' -> {vidN: clip}."""
    out = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("vid"):
            raise DataError(f"{path}:{lineno}: expected '<clip name> vid<N>', got {line[:80]!r}")
        out[parts[1]] = parts[0]
    return out


def _vid_number(vid: str, where: str) -> int:
    try:
        return int(vid[3:])
    except ValueError:
        raise DataError(f"{where}: {vid!r} is not of the form vid<N>") from None


def _all_descriptions(path: Path) -> dict[str, list[str]]:
    caps: dict[str, list[str]] = {}
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            clip, _, text = line.partition(" ")
            if not text.strip():
                raise DataError(f"{path}:{lineno}: expected '<clip name> <caption>', got {line[:80]!r}")
            caps.setdefault(clip, []).append(text.strip())
    return caps


def _split_sizes(b: Builder) -> tuple[int, int, int]:
    raw = b.options.str("split_sizes", "1200,100,670")
    try:
        sizes = tuple(int(x) for x in str(raw).split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 0:
        raise ConfigError(f"option split_sizes={raw!r}: expected three non-negative integers like 1200,100,670")
    return sizes  # type: ignore[return-value]


def prepare(
    raw_root: Path, out_dir: Path, *, download: bool = False, progress=None, options: dict | None = None
) -> PrepareSummary:
    b = SPEC.builder(raw_root, out_dir, download=download, progress=progress, options=options, fetch=False)
    sizes = _split_sizes(b)
    b.fetch(list(SPEC.downloads), download)
    video_dir = (
        "YouTubeClips" if (raw_root / "YouTubeClips").is_dir() or not (raw_root / "videos").is_dir() else "videos"
    )
    per_split: dict[str, list[tuple[str, list[str]]]] = {s: [] for s in SPLITS}
    txt = raw_root / "txt_labels"
    mapping_file = find_first(raw_root, ["youtube_mapping.txt", "txt_labels/youtube_mapping.txt"])
    if (txt / "sents_train_lc_nopunc.txt").is_file():
        if mapping_file is None:
            raise DataError(
                f"{txt / 'youtube_mapping.txt'}: needed to map vid<N> of the txt_labels files to clip names"
            )
        mapping = _mapping(mapping_file)
        b.source(mapping_file)
        for split in SPLITS:
            path = txt / f"sents_{split}_lc_nopunc.txt"
            if not path.is_file():
                continue
            b.source(path)
            caps: dict[str, list[str]] = {}
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                vid, sep, text = line.partition("\t")
                if not sep or vid not in mapping:
                    raise DataError(
                        f"{path}:{lineno}: expected 'vid<N><TAB>caption' with vid<N> in youtube_mapping.txt, got {line[:80]!r}"
                    )
                caps.setdefault(vid, []).append(text.strip())
            for vid in sorted(caps, key=lambda v: _vid_number(v, str(path))):
                per_split[split].append((mapping[vid], caps[vid]))
    else:
        ann = find_first(raw_root, ["AllVideoDescriptions.txt", "annotations/AllVideoDescriptions.txt"])
        if ann is None:
            raise DataError(f"{raw_root / 'AllVideoDescriptions.txt'}: MSVD captions not found; expected {LAYOUT}")
        b.source(ann)
        caps = _all_descriptions(ann)
        bounds = (sizes[0], sizes[0] + sizes[1])
        if mapping_file is not None:
            b.source(mapping_file)
            order = sorted(((_vid_number(v, str(mapping_file)), c) for v, c in _mapping(mapping_file).items()))
            ranked = [(n - 1, c) for n, c in order]
        else:
            ranked = list(enumerate(sorted(caps)))
        for rank, clip in ranked:
            split = "train" if rank < bounds[0] else "val" if rank < bounds[1] else "test"
            per_split[split].append((clip, caps.get(clip, [])))
    for split in SPLITS:
        items: list[dict | Skip] = []
        for clip, texts in per_split[split]:
            texts = [t for t in texts if t]
            if not texts:
                items.append(Skip("no_caption", clip))
                continue
            items.append({"id": clip, "media": f"{video_dir}/{clip}.avi", "media_type": "video", "texts": texts})
        if items:
            b.write_split(split, items, media_kind="video", total=len(items))
    b.add_view("trainval", ["train", "val"], unit="pair", fewshot_rule="per_pair", reference=REFERENCE_POOL)
    return b.finish()
