"""Visual Genome region descriptions as image-text pairs (pre-training captioning / retrieval).

Expected layout under the raw root (the official v1.2 downloads):

    <root>/region_descriptions.json   [{"id": image_id, "regions": [{"region_id", "image_id", "phrase",
                                        "x", "y", "width", "height"}]}]   (also in annotations/)
    <root>/VG_100K/2.jpg ..., <root>/VG_100K_2/1.jpg ...   (also under images/)

One sample per image: {"id": image id, "media", "texts": its distinct region phrases in file
order}. `--download` fetches the two image zips and region_descriptions.json.zip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from uniperceiver.data.download import RemoteFile
from uniperceiver.data.format import PrepareSummary
from uniperceiver.data.preparers._common import Builder, Skip, find_first, need, read_json, require_root
from uniperceiver.errors import DataError

DESCRIPTION = "Visual Genome region descriptions (pre-training captioning / retrieval)"
LAYOUT = "region_descriptions.json and the images in VG_100K/ and VG_100K_2/"
OPTIONS: dict[str, str] = {}
DOWNLOADS = [
    RemoteFile("https://cs.stanford.edu/people/rak248/VG_100K_2/images.zip", "images.zip", extract=True),
    RemoteFile("https://cs.stanford.edu/people/rak248/VG_100K_2/images2.zip", "images2.zip", extract=True),
    RemoteFile(
        "https://homes.cs.washington.edu/~ranjay/visualgenome/data/dataset/region_descriptions.json.zip",
        "region_descriptions.json.zip",
        extract=True,
    ),
]
IMAGE_DIRS = ["VG_100K", "VG_100K_2", "images/VG_100K", "images/VG_100K_2", "images"]


def _image_index(root: Path) -> dict[str, str]:
    index: dict[str, str] = {}
    for d in IMAGE_DIRS:
        if (root / d).is_dir():
            for name in sorted(n for n in (p.name for p in (root / d).iterdir()) if n.lower().endswith(".jpg")):
                index.setdefault(name.rsplit(".", 1)[0], f"{d}/{name}")
    return index


def _samples(data: list, path: Path, index: dict[str, str]) -> Iterator[dict | Skip]:
    for i, entry in enumerate(data):
        where = f"{path}: [{i}]"
        regions = need(entry, "regions", where, list)
        image_id = entry.get("id", regions[0].get("image_id") if regions else None)
        if image_id is None:
            raise DataError(f"{where}: missing key 'id'")
        texts: list[str] = []
        seen: set[str] = set()
        for r in regions:
            phrase = str(r.get("phrase", "")).strip()
            if phrase and phrase not in seen:
                seen.add(phrase)
                texts.append(phrase)
        sid = str(image_id)
        if not texts:
            yield Skip("no_caption", sid)
            continue
        yield {"id": sid, "media": index.get(sid, f"VG_100K/{sid}.jpg"), "media_type": "image", "texts": texts}


def prepare(
    raw_root: Path, out_dir: Path, *, download: bool = False, progress=None, options: dict | None = None
) -> PrepareSummary:
    b = Builder(
        "vg",
        raw_root,
        out_dir,
        options=options,
        progress=progress,
        known_options=OPTIONS,
        media_type="image",
        tasks=["vg-pt-caption", "vg-pt-retrieval"],
        fewshot_rule="per_image",
        layout=LAYOUT,
    )
    if not download:
        require_root(raw_root, "vg", LAYOUT)
    b.fetch(DOWNLOADS, download)
    ann = find_first(raw_root, ["region_descriptions.json", "annotations/region_descriptions.json"])
    if ann is None:
        raise DataError(
            f"{raw_root / 'region_descriptions.json'}: Visual Genome region descriptions not found; expected {LAYOUT}"
        )
    b.source(ann)
    data = read_json(ann)
    if not isinstance(data, list):
        raise DataError(f'{ann}: expected a JSON list of {{"id", "regions"}} entries')
    b.write_split("train", _samples(data, ann, _image_index(raw_root)), media_kind="image", total=len(data))
    return b.finish()
