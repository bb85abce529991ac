"""VQAv2 on COCO images: questions, 10 human answers, soft scores and the 3,129-answer list.

Expected layout under the raw root (the VQA site's zips extracted next to the COCO 2014 images):

    <root>/train2014/COCO_train2014_000000000009.jpg ...   (also under images/ or coco_origin/)
    <root>/val2014/COCO_val2014_000000000042.jpg ...
    <root>/v2_OpenEnded_mscoco_train2014_questions.json    {"questions": [{"image_id", "question", "question_id"}]}
    <root>/v2_mscoco_train2014_annotations.json            {"annotations": [{"question_id", "image_id",
                                                            "multiple_choice_answer", "answer_type",
                                                            "answers": [{"answer", "answer_confidence", "answer_id"}]}]}
    <root>/v2_OpenEnded_mscoco_val2014_questions.json, <root>/v2_mscoco_val2014_annotations.json
    optional: v2_OpenEnded_mscoco_test-dev2015_questions.json / _test2015_ + <root>/test2015/ images

The JSON files may also sit in annotations/, vqa/ or VQA/ (or pass option annotations=DIR). Splits:
train, val, minval (the last `minval_size` = 3,000 val questions by question id: the reference's
held-out "small val"), vg_qa (below) and test-dev / test (questions only) when their questions
file and test2015/ exist.

Answer list (targets.answers): normalised `multiple_choice_answer`s given for at least
`min_count` (9) distinct questions of `answer_splits` (train,val) -- the convention of
bottom-up-attention-vqa's compute_softscore.py that yields the common 3,129 answers; ordered by
decreasing count, then alphabetically. Each sample keeps the 10 raw answers and
"answer_scores" {normalised answer: min(1, 0.3 * count)} -- the official 10-choose-9 average of
min(#matches / 3, 1), which equals 0.3 per matching human, capped at 1.

Training pools (views; fundamentalvision/Uni-Perceiver uniperceiver/datasets/task_dataset/vqa.py:
239-269 trains on train + val[:-3000] + Visual Genome QA, and :198-209 draws the 1% split from
that same pool):
- `trainval_vg` = train + val - minval + vg_qa, the reference's pool. vg_qa holds the Visual
  Genome questions of `upctl prepare vg` (run first, same --data-dir, with VG's
  question_answers.json and image_data.json) asked about COCO train2014/val2014 images, read from
  those COCO images, whose normalised answer is in the answer list (answer_scores {answer: 1.0}) --
  the VQA+VG convention of ban-vqa's dataset.py (_load_visualgenome) behind the reference's
  VG_questions2.json / vg_target.pkl;
- `trainval` = train + val - minval: the same without Visual Genome (when vg is not prepared).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

from uniperceiver.data.download import RemoteFile
from uniperceiver.data.format import PrepareSummary, open_dataset
from uniperceiver.data.preparers._common import Builder, DatasetSpec, Skip, find_first, need, read_json
from uniperceiver.errors import ConfigError, DataError

_VQA = "https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa"
SPEC = DatasetSpec(
    "vqav2",
    "VQAv2 visual question answering (COCO 2014 images)",
    "train2014/, val2014/ (COCO images), v2_OpenEnded_mscoco_{train2014,val2014}_questions.json "
    "and v2_mscoco_{train2014,val2014}_annotations.json",
    "image",
    ("vqav2",),
    "per_answer",
    options={
        "min_count": "minimum number of questions an answer must be the answer of (default 9 -> 3,129 answers)",
        "answer_splits": "splits whose answers build the list (default train,val)",
        "annotations": "folder holding the VQA JSON files, if not the raw root",
        "minval_size": "val questions held out of the training pools, the last by question id (default 3000)",
        "vg": "auto (default: add the prepared Visual Genome QA of the same data dir) or none",
    },
    downloads=(
        RemoteFile(f"{_VQA}/v2_Questions_Train_mscoco.zip", "v2_Questions_Train_mscoco.zip", extract=True),
        RemoteFile(f"{_VQA}/v2_Annotations_Train_mscoco.zip", "v2_Annotations_Train_mscoco.zip", extract=True),
        RemoteFile(f"{_VQA}/v2_Questions_Val_mscoco.zip", "v2_Questions_Val_mscoco.zip", extract=True),
        RemoteFile(f"{_VQA}/v2_Annotations_Val_mscoco.zip", "v2_Annotations_Val_mscoco.zip", extract=True),
        RemoteFile("http://images.cocodataset.org/zips/train2014.zip", "train2014.zip", extract=True),
        RemoteFile("http://images.cocodataset.org/zips/val2014.zip", "val2014.zip", extract=True),
    ),
)
LAYOUT = SPEC.layout
# split -> (questions file, annotations file or None, COCO image folder)
SPLITS = {
    "train": ("v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json", "train2014"),
    "val": ("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json", "val2014"),
    "test-dev": ("v2_OpenEnded_mscoco_test-dev2015_questions.json", None, "test2015"),
    "test": ("v2_OpenEnded_mscoco_test2015_questions.json", None, "test2015"),
}
REFERENCE_POOL = "fundamentalvision/Uni-Perceiver uniperceiver/datasets/task_dataset/vqa.py:198-209, 239-269"
Loaded = dict[str, tuple[list[dict], dict[int, dict]]]  # split -> (questions, {question_id: annotation})


def _normalizer() -> Callable[[str], str]:
    try:
        from uniperceiver.metrics.vqa import normalize_answer
    except ImportError as exc:
        raise DataError(f"VQA answer normalisation unavailable (uniperceiver.metrics.vqa: {exc})") from None
    return normalize_answer


def soft_score(count: int) -> float:
    """Official VQA accuracy of an answer given by `count` of 10 humans (10-choose-9 average)."""
    return min(1.0, round(0.3 * count, 4))


def _image_folder(root: Path, folder: str) -> str | None:
    for base in ("", "images/", "coco_origin/"):
        if (root / f"{base}{folder}").is_dir():
            return f"{base}{folder}"
    return None


def _media(root: Path, split: str, image_id: int) -> str:
    folder = SPLITS[split][2]
    return f"{_image_folder(root, folder) or folder}/COCO_{folder}_{image_id:012d}.jpg"


def _load(b: Builder, raw_root: Path, ann_root: Path) -> Loaded:
    """The question and annotation files of every split found (train is required)."""
    ann_dirs = ["", "annotations/", "vqa/", "VQA/"]
    loaded: Loaded = {}
    for split, (qname, aname, folder) in SPLITS.items():
        qpath = find_first(ann_root, [f"{d}{qname}" for d in ann_dirs])
        if qpath is None:
            if split == "train":
                raise DataError(f"{ann_root / qname}: VQAv2 questions not found; expected {LAYOUT}")
            continue
        if _image_folder(raw_root, folder) is None and split.startswith("test"):
            continue
        questions = need(read_json(qpath), "questions", str(qpath), list)
        b.source(qpath)
        answers: dict[int, dict] = {}
        if aname is not None:
            apath = find_first(ann_root, [f"{d}{aname}" for d in ann_dirs])
            if apath is None:
                raise DataError(
                    f"{ann_root / aname}: VQAv2 annotations for {split} not found (they pair with {qpath.name})"
                )
            b.source(apath)
            for i, a in enumerate(need(read_json(apath), "annotations", str(apath), list)):
                answers[int(need(a, "question_id", f"{apath}: annotations[{i}]"))] = a
        loaded[split] = (questions, answers)
    return loaded


def _answer_list(loaded: Loaded, splits: list[str], min_count: int, normalize: Callable[[str], str]) -> list[str]:
    counts: Counter[str] = Counter()
    for split in splits:
        if split in loaded:
            for a in loaded[split][1].values():
                counts[normalize(str(a.get("multiple_choice_answer", "")))] += 1
    counts.pop("", None)
    return sorted((a for a, n in counts.items() if n >= min_count), key=lambda a: (-counts[a], a))


def _samples(raw_root: Path, split: str, loaded: Loaded, normalize: Callable[[str], str]) -> list[dict | Skip]:
    questions, answers = loaded[split]
    items: list[dict | Skip] = []
    for i, q in enumerate(questions):
        where = f"{SPLITS[split][0]}: questions[{i}]"
        qid = int(need(q, "question_id", where))
        image_id = int(need(q, "image_id", where))
        sample: dict[str, Any] = {
            "id": str(qid),
            "question_id": qid,
            "image_id": image_id,
            "question": str(need(q, "question", where, str)).strip(),
            "media": _media(raw_root, split, image_id),
            "media_type": "image",
        }
        if answers:
            a = answers.get(qid)
            if a is None:
                items.append(Skip("no_answers", f"question_id {qid}"))
                continue
            raw = [str(x.get("answer", "")) for x in need(a, "answers", f"annotation of question {qid}", list)]
            per = Counter(normalize(x) for x in raw)
            per.pop("", None)
            sample["answers"] = raw
            sample["answer_scores"] = {k: soft_score(n) for k, n in sorted(per.items())}
            if "answer_type" in a:
                sample["answer_type"] = a["answer_type"]
        items.append(sample)
    return items


def _vg_qa(b: Builder, out_dir: Path, loaded: Loaded, answer_list: list[str],
           normalize: Callable[[str], str]) -> Iterator[dict | Skip] | None:
    """Visual Genome questions on COCO train/val images with an in-list answer, as VQA samples;
    None when `upctl prepare vg` has not written its "qa" split in the same data dir."""
    if not (out_dir.parent / "vg" / "meta.json").is_file():
        return None
    vg = open_dataset("vg", out_dir.parent)
    if "qa" not in vg.splits:
        return None
    b.source(vg.root / "qa.jsonl")
    coco_split = {int(q["image_id"]): split for split in ("train", "val") if split in loaded
                  for q in loaded[split][0] if "image_id" in q}
    listed = set(answer_list)

    def items() -> Iterator[dict | Skip]:
        for s in vg.samples("qa"):
            coco_id = s.get("coco_id")
            if coco_id is None or int(coco_id) not in coco_split:
                yield Skip("not_on_coco_image", str(s["id"]))
                continue
            raw = [str(a) for a in s.get("answers") or []]
            answer = normalize(raw[0]) if raw else ""
            if answer not in listed:
                yield Skip("answer_not_in_list", f"{s['id']} {raw[:1]!r}")
                continue
            yield {"id": f"vg{s['id']}", "question_id": int(s["question_id"]), "image_id": int(coco_id),
                   "question": str(s["question"]), "answers": raw, "answer_scores": {answer: 1.0},
                   "media": _media(b.raw_root, coco_split[int(coco_id)], int(coco_id)), "media_type": "image",
                   "source": "vg"}

    return items()


def prepare(
    raw_root: Path, out_dir: Path, *, download: bool = False, progress=None, options: dict | None = None
) -> PrepareSummary:
    b = SPEC.builder(raw_root, out_dir, download=download, progress=progress, options=options, fetch=False)
    min_count = b.options.int("min_count", 9, minimum=1)
    minval_size = b.options.int("minval_size", 3000, minimum=0)
    use_vg = b.options.choice("vg", ("auto", "none"), "auto") == "auto"
    answer_splits = [s.strip() for s in str(b.options.str("answer_splits", "train,val")).split(",") if s.strip()]
    bad = [s for s in answer_splits if s not in ("train", "val")]
    if bad or not answer_splits:
        raise ConfigError(f"option answer_splits={','.join(answer_splits)!r}: expected train, val or train,val")
    b.fetch(list(SPEC.downloads), download)
    normalize = _normalizer()
    loaded = _load(b, raw_root, Path(b.options.str("annotations") or raw_root).expanduser())
    answer_list = _answer_list(loaded, answer_splits, min_count, normalize)
    for split in loaded:
        items = _samples(raw_root, split, loaded, normalize)
        b.write_split(split, items, media_kind="image", total=len(items))
        if split == "val" and minval_size:
            # the reference sorts val by question id and holds out the last 3,000 (vqa.py:250-253, 268, 279-281)
            held = set(sorted(int(q["question_id"]) for q in loaded["val"][0])[-minval_size:])
            minval = [x for x in items if isinstance(x, dict) and x["question_id"] in held]
            b.write_split("minval", minval, media_kind="image", total=len(minval))
    vg = _vg_qa(b, out_dir, loaded, answer_list, normalize) if use_vg else None
    if vg is not None:
        b.write_split("vg_qa", vg, media_kind="image")
    b.add_view("trainval", ["train", "val"], exclude="minval", fewshot_rule="per_answer", reference=REFERENCE_POOL)
    if vg is not None:
        b.add_view("trainval_vg", ["train", "val", "vg_qa"], exclude="minval", fewshot_rule="per_answer",
                   reference=REFERENCE_POOL)
    return b.finish(
        targets={"answers": answer_list},
        extra={"answer_list": {"min_count": min_count, "splits": answer_splits}, "minval_size": minval_size},
    )
