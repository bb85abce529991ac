"""Classic baselines of the mini benchmark: scikit-learn models on the same splits as the three regimes.

Why: a number such as "fine-tuning 50.8%" means little alone. Beside it the demo prints what a
classic model trained on the same training split scores on the same evaluation split, so a reader
sees at a glance whether the shared encoder is trained properly:

- image classification (`pixels_logreg`): logistic regression on the raw grayscale pixels of the
  images as prepared (32 x 32 digits, 25 x 25 faces), standardised with the training statistics;
- text classification (`tfidf_logreg`): TF-IDF of word uni- and bigrams + logistic regression;
- video-to-text retrieval (`video_nn`): every validation window scores each candidate caption by
  its cosine similarity to the nearest training window carrying that caption, on pixel features
  (4 uniformly spaced frames of the window, 16 x 16 RGB, averaged). Identical captions tie and ties
  count as hits, the rule of the demo's retrieval metric and of its chance level.

No hyper-parameter is tuned on the evaluation split (scikit-learn defaults, a fixed iteration cap),
and every model is deterministic, so the baseline has no seed spread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from uniperceiver.errors import UpctlError

#: Frames per window and their side (pixels) for the video nearest-neighbour baseline.
VIDEO_FRAMES = 4
VIDEO_SIDE = 16


class BaselineError(UpctlError):
    """A baseline cannot be computed on a prepared split (the message names dataset, split and why)."""


@dataclass(frozen=True)
class Baseline:
    """One baseline score (percent) with what it was trained and scored on."""

    method: str
    description: str
    value: float
    train_split: str
    eval_split: str
    train_samples: int
    eval_samples: int

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "description": self.description, "value": self.value,
                "train_split": self.train_split, "eval_split": self.eval_split,
                "train_samples": self.train_samples, "eval_samples": self.eval_samples}


def _samples(dataset: Any, split: str) -> list[dict]:
    samples = dataset.load_split(split)
    if not samples:
        raise BaselineError(f"dataset {dataset.name!r} split {split!r} is empty; nothing to fit or score")
    return samples


def _labels(dataset: Any, split: str, samples: Sequence[dict]) -> np.ndarray:
    missing = [s.get("id") for s in samples if not isinstance(s.get("label"), int)]
    if missing:
        raise BaselineError(f"dataset {dataset.name!r} split {split!r}: sample {missing[0]!r} has no integer 'label'")
    return np.asarray([s["label"] for s in samples], dtype=np.int64)


def image_pixels(dataset: Any, samples: Sequence[dict]) -> np.ndarray:
    """[N, H*W] grayscale pixels in [0, 1] of each sample's image, all at the size of the first one."""
    from PIL import Image

    from uniperceiver.data.media import load_image

    rows, size = [], None
    for s in samples:
        img = load_image(dataset.media_path(s)).convert("L")
        size = size or img.size
        if img.size != size:
            img = img.resize(size, Image.Resampling.BILINEAR)
        rows.append(np.asarray(img, dtype=np.float32).reshape(-1) / 255.0)
    return np.stack(rows)


def _logreg() -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=2000)


def pixels_logreg(dataset: Any, train_split: str, eval_split: str) -> Baseline:
    """Top-1 accuracy (percent) of logistic regression on standardised pixels."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    tr, ev = _samples(dataset, train_split), _samples(dataset, eval_split)
    model = make_pipeline(StandardScaler(), _logreg())
    model.fit(image_pixels(dataset, tr), _labels(dataset, train_split, tr))
    acc = float(np.mean(model.predict(image_pixels(dataset, ev)) == _labels(dataset, eval_split, ev)))
    return Baseline("pixels_logreg", "logistic regression on the grayscale pixels", 100.0 * acc,
                    train_split, eval_split, len(tr), len(ev))


def _texts(dataset: Any, split: str, samples: Sequence[dict]) -> list[str]:
    bad = [s.get("id") for s in samples if not isinstance(s.get("text"), str)]
    if bad:
        raise BaselineError(f"dataset {dataset.name!r} split {split!r}: sample {bad[0]!r} has no 'text' string")
    return [s["text"] for s in samples]


def tfidf_logreg(dataset: Any, train_split: str, eval_split: str) -> Baseline:
    """Accuracy (percent) of TF-IDF word uni/bigrams + logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_pipeline

    tr, ev = _samples(dataset, train_split), _samples(dataset, eval_split)
    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), _logreg())
    model.fit(_texts(dataset, train_split, tr), _labels(dataset, train_split, tr))
    acc = float(np.mean(model.predict(_texts(dataset, eval_split, ev)) == _labels(dataset, eval_split, ev)))
    return Baseline("tfidf_logreg", "TF-IDF (word 1-2 grams) + logistic regression", 100.0 * acc,
                    train_split, eval_split, len(tr), len(ev))


def window_features(dataset: Any, sample: dict) -> np.ndarray:
    """Mean of `VIDEO_FRAMES` uniformly spaced frames of the sample's window, VIDEO_SIDE^2 RGB in [0, 1]."""
    from PIL import Image

    from uniperceiver.data.media import sample_video_frames

    frames = sample_video_frames(dataset.media_path(sample), VIDEO_FRAMES, start=sample.get("start"),
                                 end=sample.get("end"), max_side=4 * VIDEO_SIDE)
    small = [np.asarray(Image.fromarray(f).resize((VIDEO_SIDE, VIDEO_SIDE), Image.Resampling.BILINEAR),
                        dtype=np.float32) / 255.0 for f in frames]
    return np.mean(small, axis=0).reshape(-1)


def _own_texts(dataset: Any, split: str, samples: Sequence[dict]) -> list[list[str]]:
    out = []
    for s in samples:
        texts = s.get("texts")
        if not isinstance(texts, list) or not texts:
            raise BaselineError(f"dataset {dataset.name!r} split {split!r}: sample {s.get('id')!r} has no 'texts' list")
        out.append([str(t) for t in texts])
    return out


def nn_caption_scores(train_feats: np.ndarray, train_texts: Sequence[Sequence[str]], query_feats: np.ndarray,
                      gallery: Sequence[str]) -> np.ndarray:
    """[Q, G] score of each gallery caption for each query: cosine to the nearest training item with it.

    A caption no training item carries scores -inf for every query (the baseline cannot propose it).
    """
    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    sim = unit(query_feats) @ unit(train_feats).T  # [Q, N_train]
    scores = np.full((len(query_feats), len(gallery)), -np.inf, dtype=np.float64)
    for g, caption in enumerate(gallery):
        carriers = [i for i, texts in enumerate(train_texts) if caption in texts]
        if carriers:
            scores[:, g] = sim[:, carriers].max(axis=1)
    return scores


def recall_at_1(scores: np.ndarray, positives: Sequence[Sequence[int]]) -> float:
    """Percent of queries whose best positive scores at least as high as every gallery item (ties are hits)."""
    hits = [scores[q, list(pos)].max() >= scores[q].max() for q, pos in enumerate(positives)]
    return 100.0 * float(np.mean(hits))


def video_nn(dataset: Any, train_split: str, eval_split: str) -> Baseline:
    """Video-to-text R@1 (percent) of the nearest-training-window caption ranking."""
    from sklearn.preprocessing import StandardScaler

    tr, ev = _samples(dataset, train_split), _samples(dataset, eval_split)
    scaler = StandardScaler().fit(np.stack([window_features(dataset, s) for s in tr]))
    train_feats = scaler.transform(np.stack([window_features(dataset, s) for s in tr]))
    query_feats = scaler.transform(np.stack([window_features(dataset, s) for s in ev]))
    ev_texts = _own_texts(dataset, eval_split, ev)
    gallery = [t for texts in ev_texts for t in texts]
    positives, k = [], 0
    for texts in ev_texts:
        positives.append(list(range(k, k + len(texts))))
        k += len(texts)
    scores = nn_caption_scores(train_feats, _own_texts(dataset, train_split, tr), query_feats, gallery)
    return Baseline("video_nn", "caption of the nearest training window (pixel features)",
                    recall_at_1(scores, positives), train_split, eval_split, len(tr), len(ev))


BASELINES: dict[str, Callable[[Any, str, str], Baseline]] = {
    "pixels_logreg": pixels_logreg, "tfidf_logreg": tfidf_logreg, "video_nn": video_nn,
}


def compute_baseline(method: str, dataset_name: str, data_dir: Path, train_split: str, eval_split: str) -> Baseline:
    """The baseline `method` fitted on `train_split` of a prepared dataset and scored on `eval_split`."""
    from uniperceiver.data.format import open_dataset

    try:
        fn = BASELINES[method]
    except KeyError:
        raise BaselineError(f"unknown baseline {method!r}; known: {', '.join(sorted(BASELINES))}") from None
    return fn(open_dataset(dataset_name, data_dir), train_split, eval_split)


__all__ = ["BASELINES", "Baseline", "BaselineError", "compute_baseline", "image_pixels", "nn_caption_scores",
           "pixels_logreg", "recall_at_1", "tfidf_logreg", "video_nn", "window_features"]
