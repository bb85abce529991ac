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
train, val, and test-dev / test (questions only) when their questions file and test2015/ exist.

Answer list (targets.answers): normalised `multiple_choice_answer`s given for at least
`min_count` (9) distinct questions of `answer_splits` (train,val) -- the convention of
bottom-up-attention-vqa's compute_softscore.py that yields the common 3,129 answers; ordered by
decreasing count, then alphabetically. Each sample keeps the 10 raw answers and
"answer_scores" {normalised answer: min(1, 0.3 * count)} -- the official 10-choose-9 average of
min(#matches / 3, 1), which equals 0.3 per matching human, capped at 1.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable

from uniperceiver.data.download import RemoteFile
from uniperceiver.data.format import PrepareSummary
from uniperceiver.data.preparers._common import Builder, Skip, find_first, need, read_json, require_root
from uniperceiver.errors import ConfigError, DataError

DESCRIPTION = "VQAv2 visual question answering (COCO 2014 images)"
LAYOUT = (
    "train2014/, val2014/ (COCO images), v2_OpenEnded_mscoco_{train2014,val2014}_questions.json "
    "and v2_mscoco_{train2014,val2014}_annotations.json"
)
OPTIONS = {
    "min_count": "minimum number of questions an answer must be the answer of (default 9 -> 3,129 answers)",
    "answer_splits": "splits whose answers build the list (default train,val)",
    "annotations": "folder holding the VQA JSON files, if not the raw root",
}
_VQA = "https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa"
DOWNLOADS = [
    RemoteFile(f"{_VQA}/v2_Questions_Train_mscoco.zip", "v2_Questions_Train_mscoco.zip", extract=True),
    RemoteFile(f"{_VQA}/v2_Annotations_Train_mscoco.zip", "v2_Annotations_Train_mscoco.zip", extract=True),
    RemoteFile(f"{_VQA}/v2_Questions_Val_mscoco.zip", "v2_Questions_Val_mscoco.zip", extract=True),
    RemoteFile(f"{_VQA}/v2_Annotations_Val_mscoco.zip", "v2_Annotations_Val_mscoco.zip", extract=True),
    RemoteFile("http://images.cocodataset.org/zips/train2014.zip", "train2014.zip", extract=True),
    RemoteFile("http://images.cocodataset.org/zips/val2014.zip", "val2014.zip", extract=True),
]
# split -> (questions file, annotations file or None, COCO image folder)
SPLITS = {
    "train": ("v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json", "train2014"),
    "val": ("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json", "val2014"),
    "test-dev": ("v2_OpenEnded_mscoco_test-dev2015_questions.json", None, "test2015"),
    "test": ("v2_OpenEnded_mscoco_test2015_questions.json", None, "test2015"),
}


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


def prepare(
    raw_root: Path, out_dir: Path, *, download: bool = False, progress=None, options: dict | None = None
) -> PrepareSummary:
    b = Builder(
        "vqav2",
        raw_root,
        out_dir,
        options=options,
        progress=progress,
        known_options=OPTIONS,
        media_type="image",
        tasks=["vqav2"],
        fewshot_rule="per_answer",
        layout=LAYOUT,
    )
    min_count = b.options.int("min_count", 9, minimum=1)
    answer_splits = [s.strip() for s in str(b.options.str("answer_splits", "train,val")).split(",") if s.strip()]
    bad = [s for s in answer_splits if s not in ("train", "val")]
    if bad or not answer_splits:
        raise ConfigError(f"option answer_splits={','.join(answer_splits)!r}: expected train, val or train,val")
    if not download:
        require_root(raw_root, "vqav2", LAYOUT)
    b.fetch(DOWNLOADS, download)
    ann_root = Path(b.options.str("annotations") or raw_root).expanduser()
    ann_dirs = ["", "annotations/", "vqa/", "VQA/"]
    normalize = _normalizer()

    def find(name: str) -> Path | None:
        return find_first(ann_root, [f"{d}{name}" for d in ann_dirs])

    loaded: dict[str, tuple[list[dict], dict[int, dict]]] = {}
    for split, (qname, aname, folder) in SPLITS.items():
        qpath = find(qname)
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
            apath = find(aname)
            if apath is None:
                raise DataError(
                    f"{ann_root / aname}: VQAv2 annotations for {split} not found (they pair with {qpath.name})"
                )
            b.source(apath)
            for i, a in enumerate(need(read_json(apath), "annotations", str(apath), list)):
                answers[int(need(a, "question_id", f"{apath}: annotations[{i}]"))] = a
        loaded[split] = (questions, answers)

    counts: Counter[str] = Counter()
    for split in answer_splits:
        if split in loaded:
            for a in loaded[split][1].values():
                counts[normalize(str(a.get("multiple_choice_answer", "")))] += 1
    counts.pop("", None)
    answer_list = sorted((a for a, n in counts.items() if n >= min_count), key=lambda a: (-counts[a], a))

    for split, (questions, answers) in loaded.items():
        folder = _image_folder(raw_root, SPLITS[split][2]) or SPLITS[split][2]
        prefix = SPLITS[split][2]
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
                "media": f"{folder}/COCO_{prefix}_{image_id:012d}.jpg",
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
        b.write_split(split, items, media_kind="image", total=len(items))
    return b.finish(
        targets={"answers": answer_list}, extra={"answer_list": {"min_count": min_count, "splits": answer_splits}}
    )
