"""Caption metrics checked against pycocoevalcap's own scorers on the same tokenised captions.

Needs Java (PTB tokenizer, METEOR): tests that run it are skipped when `java` is not on PATH.
"""

from __future__ import annotations

import contextlib
import io

import pytest

pycocoevalcap = pytest.importorskip("pycocoevalcap", reason="optional dependency pycocoevalcap not installed")

from pycocoevalcap.bleu.bleu import Bleu  # noqa: E402
from pycocoevalcap.cider.cider import Cider  # noqa: E402
from pycocoevalcap.meteor.meteor import Meteor  # noqa: E402
from pycocoevalcap.rouge.rouge import Rouge  # noqa: E402
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # noqa: E402

from uniperceiver.metrics.captions import (  # noqa: E402
    _ptb_tokenize,
    caption_scores,
    java_available,
    spice_jar_paths,
)
from uniperceiver.metrics import MetricError  # noqa: E402

needs_java = pytest.mark.skipif(not java_available(), reason="java not on PATH (needed by the PTB tokenizer/METEOR)")

# COCO-style data: five human captions per image, ids as in the COCO annotation files.
REFERENCES = {
    391895: ["A man with a red helmet on a small moped on a dirt road.",
             "Man riding a motor bike on a dirt road on the countryside.",
             "A man riding on the back of a motorcycle.",
             "A dirt path with a young person on a motor bike rests to the foreground of a verdant area "
             "with a bridge and a background of cloud-wreathed mountains.",
             "A man in a red shirt and a red hat is on a motorcycle on a hill side."],
    522418: ["A woman wearing a net on her head cutting a cake.",
             "A woman cutting a large white sheet cake.",
             "A woman wearing a hair net cutting a large sheet cake.",
             "there is a woman that is cutting a white cake",
             "A woman marking a cake with the back of a chef's knife."],
    184613: ["A child holding a flowered umbrella and petting a yak.",
             "A young man holding an umbrella next to a herd of cattle.",
             "a young boy barefoot holding an umbrella touching the horn of a cow",
             "A young boy with an umbrella who is touching the horn of a cow.",
             "A boy holding an umbrella while standing next to livestock."],
    318219: ["A young boy standing in front of a computer keyboard.",
             "a little boy wearing headphones and looking at a computer monitor",
             "He is listening intently to the computer at school.",
             "A young boy stares up at the computer monitor.",
             "a young kid with head phones on using a computer"],
}
PREDICTIONS = {
    391895: "A man riding a motorcycle on a dirt road.",
    522418: "A woman cutting a large white cake.",
    184613: "A boy holding an umbrella next to a cow.",
    318219: "A young boy looking at a computer monitor.",
}


def _tokenized_with_pycocoevalcap() -> tuple[dict, dict]:
    tok = PTBTokenizer()
    with contextlib.redirect_stdout(io.StringIO()):
        gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in REFERENCES.items()})
        res = tok.tokenize({k: [{"caption": c}] for k, c in PREDICTIONS.items()})
    return gts, res


@needs_java
def test_tokenizer_matches_pycocoevalcap() -> None:
    gts, res = _tokenized_with_pycocoevalcap()
    caps = {k: list(v) for k, v in REFERENCES.items()}
    assert _ptb_tokenize(caps) == gts
    assert _ptb_tokenize({k: [c] for k, c in PREDICTIONS.items()}) == res
    assert res[391895] == ["a man riding a motorcycle on a dirt road"]


@needs_java
@pytest.mark.slow
def test_scores_match_pycocoevalcap_scorers_called_directly() -> None:
    out = caption_scores(PREDICTIONS, REFERENCES)  # includes METEOR (a JVM, several seconds)
    gts, res = _tokenized_with_pycocoevalcap()
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score(gts, res)
    for n in range(4):
        assert out[f"Bleu_{n + 1}"] == pytest.approx(bleu[n], rel=1e-12)
    assert out["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0], rel=1e-12)
    assert out["ROUGE_L"] == pytest.approx(Rouge().compute_score(gts, res)[0], rel=1e-12)
    meteor = Meteor()
    try:
        assert out["METEOR"] == pytest.approx(meteor.compute_score(gts, res)[0], rel=1e-9)
    finally:
        meteor.meteor_p.kill()
    # sane magnitudes for good captions
    assert 0.3 < out["Bleu_4"] < 1.0 and 0.2 < out["METEOR"] < 0.6 and out["CIDEr"] > 1.0
    assert out["num_items"] == 4


@needs_java
def test_identical_captions_score_perfect() -> None:
    refs = {i: [c] for i, c in enumerate(["a cat sitting on a red couch", "two dogs running on the beach",
                                          "a bowl of fruit on a wooden table"])}
    preds = {i: c[0].capitalize() + "." for i, c in refs.items()}  # case and period vanish in tokenising
    out = caption_scores(preds, refs, meteor=False)
    for n in range(1, 5):
        assert out[f"Bleu_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert out["ROUGE_L"] == pytest.approx(1.0)
    assert out["METEOR"] is None
    assert "METEOR: disabled (meteor=False)" in out["skipped"]
    # a wrong caption scores far lower
    worse = caption_scores({0: "a dog", 1: "a cat", 2: "a car"}, refs, meteor=False)
    assert worse["Bleu_1"] < 0.5 and worse["CIDEr"] < out["CIDEr"]


def test_pretokenized_path_needs_no_java(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no java here
    assert not java_available()
    refs = {"a": ["a man riding a horse", "a person on a horse"], "b": ["a red bus on a street"]}
    out = caption_scores({"a": "a man riding a horse", "b": "a blue bus"}, refs, meteor=False,
                         tokenize=False, spice=False)
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score({0: refs["a"], 1: refs["b"]}, {0: ["a man riding a horse"], 1: ["a blue bus"]})
    assert out["Bleu_4"] == pytest.approx(bleu[3])
    assert out["SPICE"] is None and "SPICE: disabled (spice=False)" in out["skipped"]
    with pytest.raises(MetricError, match="java not found on PATH.*PTB tokenizer"):
        caption_scores({"a": "x"}, {"a": ["y"]}, meteor=False)


def test_spice_skipped_or_required() -> None:
    missing = [p for p in spice_jar_paths() if not p.is_file()]
    if not missing:
        pytest.skip("Stanford CoreNLP jars for SPICE are installed here; the skip path cannot be shown")
    out = caption_scores({1: "a cat"}, {1: ["a cat on a mat"]}, meteor=False, tokenize=False)
    assert out["SPICE"] is None
    assert f"SPICE: Stanford CoreNLP jar not found at {missing[0]}" in out["skipped"]
    with pytest.raises(MetricError, match="SPICE requested"):
        caption_scores({1: "a cat"}, {1: ["a cat on a mat"]}, meteor=False, tokenize=False, spice=True)


def test_bad_input() -> None:
    with pytest.raises(MetricError, match="same ids"):
        caption_scores({1: "a cat"}, {1: ["a cat"], 2: ["a dog"]}, meteor=False, tokenize=False)
    with pytest.raises(MetricError, match="non-empty list"):
        caption_scores({1: "a cat"}, {1: []}, meteor=False, tokenize=False)
    with pytest.raises(MetricError, match="one caption string"):
        caption_scores({1: ["a cat"]}, {1: ["a cat"]}, meteor=False, tokenize=False)  # type: ignore[dict-item]
