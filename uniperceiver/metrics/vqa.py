"""VQA soft accuracy, reproducing the official VQA evaluation exactly.

Reference: GT-Vision-Lab/VQA, `PythonEvaluationTools/vqaEvaluation/vqaEval.py`, latest commit
(a013f00). Numbers on the VQAv2 leaderboard (EvalAI) and in the Uni-Perceiver paper come from that
code, so its quirks are part of the metric and are kept on purpose (our own code, same behaviour):

1. Newlines and tabs become spaces, then both ends are stripped (predictions and human answers).
2. Only when the 10 human answers are NOT all identical (as strings, after step 1) are the human
   answers AND the prediction normalised (punctuation, then digits/articles/contractions). When
   all ten agree nothing is normalised, so "Yes" or "yes." scores 0 against ten "yes".
   (Older copies, e.g. the 2017 file LAVIS vendors, always normalise the prediction and only
   strip punctuation from the human answers; they disagree with the leaderboard on such cases.)
3. Punctuation: for each mark in the list, if the ORIGINAL text has the mark followed or preceded
   by a space, or the text contains a digit,comma,digit ANYWHERE (e.g. "2,000"), the mark is
   deleted; otherwise it is replaced by a space. Apostrophes, colons and periods are not in the
   list. Then periods not followed by a digit are deleted, at most 32 of them (the official code
   passes `re.UNICODE` (= 32) where `re.sub` expects its `count`). The period pattern's
   "(?!<=\\d)" is a typo for a look-behind and in effect checks nothing.
4. Digits/articles: lower-case, split on whitespace, map number words "none".."ten" to digits,
   drop "a", "an", "the", expand apostrophe-less contractions ("isnt" -> "isn't"); keys with
   capitals ("Im", "Ive", ...) can never match lower-cased words, as in the original.
5. Per question: for each of the 10 human answers, leave it out and score min(#other humans whose
   answer equals the prediction / 3, 1); average the 10 scores (the 10-choose-9 average).
6. Reports: round(100 * x, 2); overall = round(100 * sum / count, 2) over all questions.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Hashable, Literal, Mapping, Sequence

from uniperceiver.metrics import MetricError

__all__ = [
    "normalize_answer",
    "process_punctuation",
    "process_digit_article",
    "vqa_accuracy",
    "vqa_score",
    "answer_soft_scores",
]

_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
_MANUAL_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# Same pattern text as the official file (its "(?!<=\d)" is a no-op look-ahead, see module doc).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_PUNCT: tuple[str, ...] = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                           ">", "<", "@", "`", ",", "?", "!")
# The official call is periodStrip.sub("", text, re.UNICODE): the flag lands in `count`.
_PERIOD_STRIP_COUNT = int(re.UNICODE)  # == 32


def _clean_whitespace(text: str) -> str:
    """Official step 1: newlines and tabs become spaces, then the ends are stripped."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """The official `processPunctuation` (see the module docstring, point 3)."""
    out = text
    has_digit_comma_digit = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or has_digit_comma_digit:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The official `processDigitArticle` (see the module docstring, point 4)."""
    words = [_MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(ans: str) -> str:
    """Whitespace clean-up, then the official punctuation and digit/article processing.

    This is what the official code applies to every answer of a question whose human answers
    disagree; use it to build answer vocabularies and training targets. (Scoring must go through
    `vqa_accuracy`, which skips normalisation when all humans agree.)
    """
    if not isinstance(ans, str):
        raise MetricError(f"answer: expected a string, got {type(ans).__name__} {ans!r}")
    return process_digit_article(process_punctuation(_clean_whitespace(ans)))


def _answer_strings(gt_answers: Sequence[Any], where: str) -> list[str]:
    """Accept plain strings or the official annotation dicts {"answer": ..., ...}."""
    if isinstance(gt_answers, str) or not isinstance(gt_answers, Sequence):
        raise MetricError(f"{where}: expected a list of human answers, got {type(gt_answers).__name__}")
    if len(gt_answers) == 0:
        raise MetricError(f"{where}: no human answers")
    out = []
    for a in gt_answers:
        if isinstance(a, Mapping):
            a = a.get("answer")
        if not isinstance(a, str):
            raise MetricError(f"{where}: every human answer must be a string, got {a!r}")
        out.append(a)
    return out


def vqa_accuracy(pred: str, gt_answers: Sequence[Any]) -> float:
    """Official VQA accuracy (0..1, unrounded) of one predicted answer against the human answers.

    Averages, over leaving out each human answer in turn, min(#remaining humans who said exactly
    the (conditionally normalised) prediction / 3, 1). Answers may be strings or the annotation
    dicts with an "answer" key. Normalisation happens only when the humans disagree.
    """
    if not isinstance(pred, str):
        raise MetricError(f"prediction: expected a string, got {type(pred).__name__} {pred!r}")
    gts = [_clean_whitespace(a) for a in _answer_strings(gt_answers, "gt_answers")]
    res = _clean_whitespace(pred)
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
        res = process_digit_article(process_punctuation(res))
    accs = []
    for i in range(len(gts)):
        matching = sum(1 for j, a in enumerate(gts) if j != i and a == res)
        accs.append(min(1, float(matching) / 3))
    return float(sum(accs)) / len(accs)


def vqa_score(preds: Mapping[Hashable, str], gts: Mapping[Hashable, Sequence[Any]],
              answer_types: Mapping[Hashable, str] | None = None,
              question_types: Mapping[Hashable, str] | None = None,
              ndigits: int = 2) -> dict[str, Any]:
    """Official VQA evaluation of a set of predictions, numbers in percent rounded to 2 places.

    `preds[qid]` is the predicted answer, `gts[qid]` the human answers (strings or annotation
    dicts). The question ids must match exactly, as the official loader asserts. Returns
    ``{"overall", "per_answer_type", "per_question_type", "per_question", "num_questions"}``;
    the per-type dicts are empty when the types are not given (VQAv2 answer types are
    "yes/no", "number", "other").
    """
    missing = [q for q in gts if q not in preds]
    extra = [q for q in preds if q not in gts]
    if missing or extra:
        raise MetricError(
            f"predictions and ground truth must cover the same question ids: {len(missing)} without a "
            f"prediction (e.g. {missing[:3]!r}), {len(extra)} not in the ground truth (e.g. {extra[:3]!r}); "
            "check int vs str ids")
    if not gts:
        raise MetricError("gts: no questions to evaluate")
    for name, types in (("answer_types", answer_types), ("question_types", question_types)):
        if types is not None:
            lacking = [q for q in gts if q not in types]
            if lacking:
                raise MetricError(f"{name}: no type for {len(lacking)} question(s), e.g. {lacking[:3]!r}")
    acc_all: list[float] = []
    by_ans: dict[str, list[float]] = {}
    by_ques: dict[str, list[float]] = {}
    per_question: dict[Hashable, float] = {}
    for qid, answers in gts.items():
        try:
            acc = vqa_accuracy(preds[qid], answers)
        except MetricError as exc:
            raise MetricError(f"question {qid!r}: {exc}") from exc
        acc_all.append(acc)
        per_question[qid] = round(100 * acc, ndigits)
        if answer_types is not None:
            by_ans.setdefault(answer_types[qid], []).append(acc)
        if question_types is not None:
            by_ques.setdefault(question_types[qid], []).append(acc)

    def agg(values: list[float]) -> float:
        return round(100 * float(sum(values)) / len(values), ndigits)

    return {
        "overall": agg(acc_all),
        "per_answer_type": {t: agg(v) for t, v in by_ans.items()},
        "per_question_type": {t: agg(v) for t, v in by_ques.items()},
        "per_question": per_question,
        "num_questions": len(acc_all),
    }


def answer_soft_scores(gt_answers: Sequence[Any],
                       scheme: Literal["count/3", "bottom-up"] = "count/3") -> dict[str, float]:
    """Soft training target: a score for every distinct normalised human answer.

    Answers are normalised with `normalize_answer` and counted. Default scheme "count/3":
    min(1, count / 3), the VQA accuracy formula without the leave-one-out averaging (the common
    soft target). Scheme "bottom-up": 0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 / 3 / 4+ humans, the
    `compute_softscore` of hengyuan-hu/bottom-up-attention-vqa whose `train_target.pkl` the
    Uni-Perceiver reference loads. Training samples one answer per question proportionally to
    these scores; answers outside the answer vocabulary are the caller's to drop.
    """
    counts = Counter(normalize_answer(a) for a in _answer_strings(gt_answers, "gt_answers"))
    if scheme == "count/3":
        return {a: min(1.0, c / 3.0) for a, c in counts.items()}
    if scheme == "bottom-up":
        return {a: (1.0 if c >= 4 else (0.3, 0.6, 0.9)[c - 1]) for a, c in counts.items()}
    raise MetricError(f"scheme {scheme!r} is unknown; expected 'count/3' or 'bottom-up'")
