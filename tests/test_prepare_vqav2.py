"""VQAv2 preparer: official question/annotation JSON files, answer list, soft scores."""

from __future__ import annotations

import pytest
from fixtures import layouts

from uniperceiver.data.format import open_dataset, prepare_dataset
from uniperceiver.data.preparers.vqav2 import soft_score
from uniperceiver.errors import ConfigError, DataError


def test_soft_score_is_the_official_10_choose_9_average():
    for count in range(11):
        # official: mean over the 10 leave-one-out subsets of min(matches / 3, 1)
        official = sum(min((count - (1 if k < count else 0)) / 3, 1.0) for k in range(10)) / 10
        assert soft_score(count) == pytest.approx(official, abs=1e-4)


def test_vqav2_prepare(tmp_path):
    raw, data = tmp_path / "coco", tmp_path / "data"
    expected = layouts.make_vqav2(raw)
    s = prepare_dataset("vqav2", raw, data, options={"min_count": "2"})
    assert s.splits == expected["splits"] and s.skipped == expected["skipped"]
    ds = open_dataset("vqav2", data)
    assert ds.answers == ["yes", "2"]  # yes: 6 questions, 2: 3, the rest below min_count
    train = ds.load_split("train")
    q = next(x for x in train if x["question_id"] == 9001)
    assert q["question"] == "How many cups are there?" and q["media"] == "train2014/COCO_train2014_000000000009.jpg"
    assert len(q["answers"]) == 10 and q["answers"].count("two") == 2
    assert q["answer_scores"] == {"2": 1.0, "3": 0.6}  # "two" normalises to "2": 8 humans
    red = next(x for x in train if x["question_id"] == 9002)
    assert red["answer_scores"] == {"orange": 1.0, "red": 1.0}  # "Red." -> "red"
    val = ds.load_split("val")
    assert [x["id"] for x in val] == ["42000", "42001"] and val[1]["answer_type"] == "number"
    assert ds.meta["fewshot_rule"] == "per_answer"
    # minval (default: the last 3,000 val questions by id) holds all of this small val out of the pool
    assert [x["id"] for x in ds.load_split("minval")] == ["42000", "42001"]
    assert ds.views["trainval"] == {"parts": ["train", "val"], "exclude": "minval", "unit": "sample",
                                    "num_samples": 6, "fewshot_rule": "per_answer",
                                    "reference": ds.views["trainval"]["reference"]}
    assert [x["id"] for x in ds.load_split("trainval")] == [x["id"] for x in train]
    assert "trainval_vg" not in ds.views  # Visual Genome is not prepared in this data dir

    s1 = prepare_dataset("vqav2", raw, data, options={"min_count": "1"})
    assert open_dataset("vqav2", data).answers == ["yes", "2", "1", "red"]
    assert s1.splits == expected["splits"]
    assert open_dataset("vqav2", data).meta["answer_list"] == {"min_count": 1, "splits": ["train", "val"]}
    prepare_dataset("vqav2", raw, data, options={"min_count": "1", "answer_splits": "val"})
    assert open_dataset("vqav2", data).answers == ["1", "yes"]


def test_vqav2_errors(tmp_path):
    raw, data = tmp_path / "coco", tmp_path / "data"
    layouts.make_vqav2(raw)
    with pytest.raises(ConfigError, match="answer_splits"):
        prepare_dataset("vqav2", raw, data, options={"answer_splits": "test"})
    with pytest.raises(ConfigError, match="option vg='yes' for vqav2: expected one of auto, none"):
        prepare_dataset("vqav2", raw, data, options={"vg": "yes"})
    with pytest.raises(ConfigError, match="option minval_size='-1' for vqav2: expected an integer >= 0"):
        prepare_dataset("vqav2", raw, data, options={"minval_size": "-1"})
    (raw / "v2_mscoco_val2014_annotations.json").unlink()
    with pytest.raises(DataError, match=r"v2_mscoco_val2014_annotations\.json: VQAv2 annotations for val not found"):
        prepare_dataset("vqav2", raw, data)
    (raw / "v2_OpenEnded_mscoco_val2014_questions.json").unlink()  # no val questions: val is not prepared
    (raw / "v2_OpenEnded_mscoco_train2014_questions.json").write_text(
        '{"questions": [{"image_id": 9, "question": "x"}]}'
    )
    with pytest.raises(DataError, match=r"questions\[0\]: missing key 'question_id'"):
        prepare_dataset("vqav2", raw, data)
