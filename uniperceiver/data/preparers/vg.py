"""Visual Genome: region descriptions as image-text pairs (pre-training captioning / retrieval),
and its question answers (VQAv2 fine-tuning augmentation).

Expected layout under the raw root (the official v1.2 downloads):

    <root>/region_descriptions.json   [{"id": image_id, "regions": [{"region_id", "image_id", "phrase",
                                        "x", "y", "width", "height"}]}]   (also in annotations/)
    <root>/VG_100K/2.jpg ..., <root>/VG_100K_2/1.jpg ...   (also under images/)
    optional, for the "qa" split:
    <root>/question_answers.json      [{"id": image_id, "qas": [{"qa_id", "image_id", "question", "answer",
                                        "q_objects", "a_objects"}]}]   (also in annotations/)
    <root>/image_data.json            [{"image_id" (v1.0: "id"), "coco_id", "flickr_id", "url", "width", "height"}]

Split "train": one sample per image, {"id": image id, "media", "texts": its distinct region
phrases in file order}. Split "qa" (with question_answers.json): one sample per question,
{"id": qa_id, "question_id", "image_id", "coco_id" (from image_data.json, null when the image is
not a COCO image or image_data.json is absent), "question", "answers": [the raw answer], "media"};
`upctl prepare vqav2` run afterwards adds the ones on COCO images to its `trainval_vg` view.
`--download` fetches the two image zips, region_descriptions.json.zip, question_answers.json.zip
and image_data.json.zip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from uniperceiver.data.download import RemoteFile
from uniperceiver.data.format import PrepareSummary
from uniperceiver.data.preparers._common import Builder, DatasetSpec, Skip, find_first, need, read_json
from uniperceiver.errors import DataError

_VG = "https://homes.cs.washington.edu/~ranjay/visualgenome/data/dataset"
SPEC = DatasetSpec(
    "vg",
    "Visual Genome region descriptions (pre-training captioning / retrieval) and question answers",
    "region_descriptions.json and the images in VG_100K/ and VG_100K_2/ (+ question_answers.json, image_data.json)",
    "image",
    ("vg-pt-caption", "vg-pt-retrieval"),
    "per_image",
    downloads=(
        RemoteFile("https://cs.stanford.edu/people/rak248/VG_100K_2/images.zip", "images.zip", extract=True),
        RemoteFile("https://cs.stanford.edu/people/rak248/VG_100K_2/images2.zip", "images2.zip", extract=True),
        *(RemoteFile(f"{_VG}/{name}.json.zip", f"{name}.json.zip", extract=True)
          for name in ("region_descriptions", "question_answers", "image_data")),
    ),
)
LAYOUT = SPEC.layout
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


def _coco_ids(root: Path, b: Builder) -> dict[int, int]:
    """VG image id -> COCO image id, from image_data.json ({} without it)."""
    path = find_first(root, ["image_data.json", "annotations/image_data.json"])
    if path is None:
        return {}
    b.source(path)
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f'{path}: expected a JSON list of {{"image_id", "coco_id", ...}} entries')
    out: dict[int, int] = {}
    for i, entry in enumerate(data):
        image_id = entry.get("image_id", entry.get("id")) if isinstance(entry, dict) else None
        if image_id is None:
            raise DataError(f"{path}: [{i}]: missing key 'image_id'")
        if entry.get("coco_id") is not None:
            out[int(image_id)] = int(entry["coco_id"])
    return out


def _qa_samples(data: list, path: Path, index: dict[str, str], coco: dict[int, int]) -> Iterator[dict | Skip]:
    for i, entry in enumerate(data):
        where = f"{path}: [{i}]"
        for j, qa in enumerate(need(entry, "qas", where, list)):
            at = f"{where}.qas[{j}]"
            qa_id = int(need(qa, "qa_id", at))
            image_id = int(qa.get("image_id", entry.get("id", -1)))
            question, answer = str(need(qa, "question", at)).strip(), str(need(qa, "answer", at)).strip()
            if not question or not answer:
                yield Skip("no_answer" if question else "no_question", str(qa_id))
                continue
            yield {"id": str(qa_id), "question_id": qa_id, "image_id": image_id, "coco_id": coco.get(image_id),
                   "question": question, "answers": [answer], "media": index.get(str(image_id), f"VG_100K/{image_id}.jpg"),
                   "media_type": "image"}


def prepare(
    raw_root: Path, out_dir: Path, *, download: bool = False, progress=None, options: dict | None = None
) -> PrepareSummary:
    b = SPEC.builder(raw_root, out_dir, download=download, progress=progress, options=options)
    ann = find_first(raw_root, ["region_descriptions.json", "annotations/region_descriptions.json"])
    if ann is None:
        raise DataError(
            f"{raw_root / 'region_descriptions.json'}: Visual Genome region descriptions not found; expected {LAYOUT}"
        )
    b.source(ann)
    data = read_json(ann)
    if not isinstance(data, list):
        raise DataError(f'{ann}: expected a JSON list of {{"id", "regions"}} entries')
    index = _image_index(raw_root)
    b.write_split("train", _samples(data, ann, index), media_kind="image", total=len(data))
    qa_path = find_first(raw_root, ["question_answers.json", "annotations/question_answers.json"])
    if qa_path is not None:
        b.source(qa_path)
        qas = read_json(qa_path)
        if not isinstance(qas, list):
            raise DataError(f'{qa_path}: expected a JSON list of {{"id", "qas"}} entries')
        b.write_split("qa", _qa_samples(qas, qa_path, index, _coco_ids(raw_root, b)), media_kind="image")
    return b.finish()
