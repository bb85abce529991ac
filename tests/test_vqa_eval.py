"""Hand-worked cases of every quirk of the official VQA evaluation (GT-Vision-Lab/VQA a013f00)."""

from __future__ import annotations

import pytest

from uniperceiver.metrics import MetricError
from uniperceiver.metrics.vqa import (
    answer_soft_scores,
    normalize_answer,
    process_punctuation,
    vqa_accuracy,
    vqa_score,
)


@pytest.mark.parametrize("raw,expected", [
    # digit,comma,digit anywhere: every punctuation mark is deleted, not spaced
    ("2,000", "2000"),
    ("1,000 (approx)", "1000 approx"),
    # no digit,digit: a mark without a neighbouring space becomes a space
    ("red,white", "red white"),
    ("(approx)", "approx"),
    # a mark with a space next to it is deleted (words keep their own spaces)
    ("red, white", "red white"),
    ("t - shirt", "t shirt"),
    ("red-white", "red white"),
    # periods: deleted unless followed by a digit
    ("yes.", "yes"),
    ("u.s.", "us"),
    ("3.5", "3.5"),
    (".5", ".5"),
    # apostrophes and colons are not punctuation here
    ("dog's", "dog's"),
    ("10:30", "10:30"),
    # number words become digits, articles go, case is folded
    ("two", "2"),
    ("Two Dogs", "2 dogs"),
    ("none", "0"),
    ("ten", "10"),
    ("eleven", "eleven"),
    ("a dog", "dog"),
    ("The cat", "cat"),
    ("an", ""),
    # apostrophe-less contractions are expanded; capitalised keys never match
    ("isnt", "isn't"),
    ("Isnt", "isn't"),
    ("dont know", "don't know"),
    ("Im", "im"),
    # whitespace: tabs/newlines become spaces, runs collapse
    ("  blue\tsky\n", "blue sky"),
    ("yes!", "yes"),
    ("what?", "what"),
])
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_period_strip_stops_after_32() -> None:
    # The official code passes re.UNICODE (32) as the `count` of re.sub.
    assert process_punctuation("x" + "." * 40) == "x" + "." * 8
    assert normalize_answer("." * 32) == ""


def test_digit_comma_digit_changes_other_marks() -> None:
    # Same slash, different neighbourhood: spaced normally, deleted once a digit,digit appears.
    assert normalize_answer("cats/dogs") == "cats dogs"
    assert normalize_answer("cats/dogs 1,2") == "catsdogs 12"


def test_quirk_pairs_match_when_humans_disagree() -> None:
    # 4 of 10 humans: every leave-one-out subset keeps >= 3 matches, so a match scores 1.0.
    assert vqa_accuracy("2,000", ["2000"] * 4 + ["3000"] * 6) == 1.0
    assert vqa_accuracy("yes.", ["yes"] * 4 + ["no"] * 6) == 1.0
    assert vqa_accuracy("a dog", ["dog"] * 4 + ["cat"] * 6) == 1.0
    assert vqa_accuracy("isnt", ["isn't"] * 4 + ["is"] * 6) == 1.0
    assert vqa_accuracy("two", ["2"] * 4 + ["3"] * 6) == 1.0
    assert vqa_accuracy("Two", ["two"] * 4 + ["3"] * 6) == 1.0
    assert vqa_accuracy("2,000", ["2000"] * 3 + ["3000"] * 7) == pytest.approx(0.9)  # 3 humans
    assert vqa_accuracy("2.000", ["2000"] * 4 + ["3000"] * 6) == 0.0  # a decimal point is kept


def test_identical_human_answers_prediction_not_normalised() -> None:
    tens = ["yes"] * 10
    assert vqa_accuracy("yes", tens) == 1.0
    assert vqa_accuracy("yes.", tens) == 0.0
    assert vqa_accuracy("Yes", tens) == 0.0
    # ...and the human answers are not normalised either
    assert vqa_accuracy("2", ["two"] * 10) == 0.0
    assert vqa_accuracy("two", ["two"] * 10) == 1.0
    assert vqa_accuracy("dog", ["a dog"] * 10) == 0.0
    # whitespace clean-up does happen first, on both sides
    assert vqa_accuracy(" yes\n", ["yes\t"] * 10) == 1.0
    # one dissenting human switches normalisation on
    assert vqa_accuracy("yes.", ["yes"] * 9 + ["yeah"]) == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 9 + ["yeah"]) == 1.0


def test_leave_one_out_average_by_hand() -> None:
    gts = ["dog"] * 2 + ["cat"] * 3 + ["bird"] * 4 + ["fish"]
    # "dog": leaving out one of the 2 dogs (2 subsets) leaves 1 match -> 1/3;
    #        leaving out any of the other 8 leaves 2 matches -> 2/3.  (2/3 + 16/3) / 10 = 0.6
    assert vqa_accuracy("dog", gts) == pytest.approx(0.6)
    # "cat": 3 subsets with 2 matches -> 2/3, 7 subsets with 3 -> 1.  (2 + 7) / 10 = 0.9
    assert vqa_accuracy("cat", gts) == pytest.approx(0.9)
    # "bird": 4 humans, at least 3 remain in every subset -> 1.0
    assert vqa_accuracy("bird", gts) == 1.0
    # "fish": 1 subset with 0 matches, 9 with 1 -> 9 * (1/3) / 10 = 0.3
    assert vqa_accuracy("fish", gts) == pytest.approx(0.3)
    assert vqa_accuracy("horse", gts) == 0.0
    # the humans disagree, so the prediction is normalised: "the dog" -> "dog"
    assert vqa_accuracy("the dog", gts) == pytest.approx(0.6)


def test_official_annotation_dicts_accepted() -> None:
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
               for i, a in enumerate(["2"] * 2 + ["two"] * 2 + ["3"] * 6)]
    # "2" and "two" both normalise to "2": 4 humans agree.
    assert vqa_accuracy("2", answers) == 1.0


def test_vqa_score_rounding_and_types() -> None:
    gts = {
        1: ["yes"] * 10,
        2: ["dog"] * 2 + ["cat"] * 3 + ["bird"] * 4 + ["fish"],
        3: ["dog"] * 2 + ["cat"] * 3 + ["bird"] * 4 + ["fish"],
    }
    preds = {1: "yes", 2: "dog", 3: "fish"}
    out = vqa_score(preds, gts, answer_types={1: "yes/no", 2: "other", 3: "other"},
                    question_types={1: "is the", 2: "what", 3: "what"})
    # (1.0 + 0.6 + 0.3) / 3 = 0.6333.. -> 63.33
    assert out["overall"] == 63.33
    assert out["per_answer_type"] == {"yes/no": 100.0, "other": 45.0}
    assert out["per_question_type"] == {"is the": 100.0, "what": 45.0}
    assert out["per_question"] == {1: 100.0, 2: 60.0, 3: 30.0}
    assert out["num_questions"] == 3
    plain = vqa_score(preds, gts)
    assert plain["overall"] == 63.33 and plain["per_answer_type"] == {}


def test_vqa_score_id_mismatch_is_an_error() -> None:
    with pytest.raises(MetricError, match="1 without a prediction"):
        vqa_score({1: "yes"}, {1: ["yes"] * 10, 2: ["no"] * 10})
    with pytest.raises(MetricError, match="not in the ground truth"):
        vqa_score({"1": "yes"}, {1: ["yes"] * 10})
    with pytest.raises(MetricError, match="no human answers"):
        vqa_accuracy("yes", [])
    with pytest.raises(MetricError, match="answer_types"):
        vqa_score({1: "yes"}, {1: ["yes"] * 10}, answer_types={})


def test_answer_soft_scores() -> None:
    gts = ["two", "2", "Two", "2", "a dog", "dog", "cat", "cats", "2", "two"]
    # normalised counts: "2" x6, "dog" x2, "cat" x1, "cats" x1
    assert answer_soft_scores(gts) == pytest.approx({"2": 1.0, "dog": 2 / 3, "cat": 1 / 3, "cats": 1 / 3})
    assert answer_soft_scores(gts, scheme="bottom-up") == pytest.approx(
        {"2": 1.0, "dog": 0.6, "cat": 0.3, "cats": 0.3})
    assert answer_soft_scores(["red"] * 3, scheme="bottom-up") == pytest.approx({"red": 0.9})
    with pytest.raises(MetricError, match="scheme"):
        answer_soft_scores(gts, scheme="linear")  # type: ignore[arg-type]
