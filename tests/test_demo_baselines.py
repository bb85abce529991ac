"""The classic baselines of the mini benchmark, on the real prepared mini splits (prepared once here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from uniperceiver.data.format import open_dataset, prepare_dataset
from upctl.demo_baselines import (BaselineError, compute_baseline, image_pixels, nn_caption_scores, pixels_logreg,
                                  recall_at_1, tfidf_logreg)

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("baseline-mini")
    prepare_dataset("mini", None, root, options={"only": "digits,faces,sentiment,video"})
    return root


def test_pixel_logistic_regression_on_digits_is_a_strong_baseline(mini: Path) -> None:
    ds = open_dataset("mini-digits", mini)
    b = compute_baseline("pixels_logreg", "mini-digits", mini, "train", "val")
    assert (b.train_samples, b.eval_samples) == (ds.num_samples("train"), ds.num_samples("val")) == (1258, 269)
    assert b.value > 85.0  # a linear model separates 8x8 digits well; chance is 10%
    assert b.value == compute_baseline("pixels_logreg", "mini-digits", mini, "train", "val").value  # deterministic
    # The value is a share of the 269 validation images.
    assert round(b.value * 269 / 100) == pytest.approx(b.value * 269 / 100, abs=1e-6)


def test_pixels_are_the_prepared_images_as_grayscale(mini: Path) -> None:
    ds = open_dataset("mini-faces", mini)
    samples = ds.load_split("val")[:3]
    x = image_pixels(ds, samples)
    assert x.shape == (3, 25 * 25) and x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert np.std(x[0]) > 0.01  # real image content, not a constant
    b = pixels_logreg(ds, "train", "val")
    assert (b.train_samples, b.eval_samples) == (100, 100) and b.value > 80.0


def test_tfidf_baseline_on_sentiment_counts_its_samples(mini: Path) -> None:
    ds = open_dataset("mini-sentiment", mini)
    b = tfidf_logreg(ds, "train", "val")
    assert (b.train_samples, b.eval_samples) == (100, 100)
    assert 0.0 <= b.value <= 100.0 and b.value == round(b.value)  # 100 sentences: whole percent steps
    assert b.as_dict()["method"] == "tfidf_logreg"


def test_video_nearest_neighbour_retrieves_the_clip_captions(mini: Path) -> None:
    b = compute_baseline("video_nn", "mini-video", mini, "train", "val")
    assert (b.train_samples, b.eval_samples) == (29, 9)
    # Train and val windows of one clip look alike; pixel features find the clip of every window.
    assert b.value >= 100.0 * 6 / 9


def test_nn_scores_and_recall_count_ties_as_hits() -> None:
    train = np.array([[1.0, 0.0], [0.0, 1.0]])
    train_texts = [["a cat"], ["a dog"]]
    queries = np.array([[0.9, 0.1], [0.2, 0.8], [1.0, 1.0]])
    gallery = ["a cat", "a dog", "a cat", "a bird"]
    scores = nn_caption_scores(train, train_texts, queries, gallery)
    assert scores.shape == (3, 4) and np.isneginf(scores[:, 3]).all()  # no training item says "a bird"
    assert scores[0, 0] == scores[0, 2]  # identical captions score identically
    assert recall_at_1(scores, [[0], [1], [3]]) == pytest.approx(200.0 / 3)
    # query 2 is equally near both: its tie with the best caption counts as a hit
    assert recall_at_1(scores, [[2], [1], [1]]) == pytest.approx(100.0)


def test_bad_splits_give_one_line(mini: Path, tmp_path: Path) -> None:
    with pytest.raises(BaselineError, match="unknown baseline 'svm'"):
        compute_baseline("svm", "mini-digits", mini, "train", "val")
    # A dataset whose samples carry no labels cannot fit a classifier: the error names sample and key.
    ds_dir = tmp_path / "nolabel"
    ds_dir.mkdir()
    meta = json.loads((mini / "mini-sentiment" / "meta.json").read_text())
    for split in ("train", "val"):
        rows = [json.loads(line) for line in (mini / "mini-sentiment" / f"{split}.jsonl").read_text().splitlines()]
        rows[0].pop("label")
        (ds_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (ds_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(BaselineError, match=r"split 'train': sample '.*' has no integer 'label'") as exc:
        compute_baseline("tfidf_logreg", "nolabel", tmp_path, "train", "val")
    assert "\n" not in str(exc.value)
