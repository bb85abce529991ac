"""Tests of uniperceiver.metrics against hand-worked cases, brute force and sklearn/scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn import metrics as skm
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits
from sklearn.linear_model import LinearRegression, LogisticRegression

from uniperceiver.errors import UpctlError
from uniperceiver.metrics import (
    GLUE_MAIN_METRIC,
    MetricError,
    accuracy,
    f1_binary,
    glue_metrics,
    image_text_retrieval,
    matthews_corrcoef,
    multiview_accuracy,
    pearson_spearman,
    retrieval_recall,
    topk_accuracy,
)


# ------------------------------------------------------------------ classification


def test_topk_hand_example() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.3],   # label 1 -> top1 hit
                           [0.5, 0.1, 0.4, 0.2],   # label 2 -> 2nd best: top1 miss, top2 hit
                           [0.0, 0.1, 0.2, 0.3]])  # label 0 -> worst: miss at k<=3
    labels = torch.tensor([1, 2, 0])
    out = topk_accuracy(logits, labels, ks=(1, 2, 3, 4))
    assert out == pytest.approx({"top1": 100 / 3, "top2": 200 / 3, "top3": 200 / 3, "top4": 100.0})


def test_topk_k_larger_than_classes_is_clamped() -> None:
    out = topk_accuracy(np.array([[0.2, 0.8], [0.9, 0.1]]), [0, 0], ks=(1, 5))
    assert out == {"top1": 50.0, "top5": 100.0}


@pytest.fixture(scope="module")
def digits_scores() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    # A deliberately weak model (8 of 64 pixels) so that top-1 and top-5 differ.
    weak = LogisticRegression(max_iter=300).fit(x[:1000, 20:28] / 16.0, y[:1000])
    return weak.decision_function(x[1000:, 20:28] / 16.0), y[1000:]


def test_topk_matches_sklearn_on_digits(digits_scores: tuple[np.ndarray, np.ndarray]) -> None:
    scores, y = digits_scores
    out = topk_accuracy(torch.from_numpy(scores), torch.from_numpy(y), ks=(1, 3, 5))
    for k in (1, 3, 5):
        assert out[f"top{k}"] == pytest.approx(100 * skm.top_k_accuracy_score(y, scores, k=k), abs=1e-9)
    assert out["top1"] < out["top5"] < 100.0


def test_multiview_averages_softmax_not_logits() -> None:
    # Mean of raw logits says class 0 ([3.33, 1.33]); mean of per-view softmax says class 1.
    views = torch.tensor([[[10.0, 0.0], [0.0, 2.0], [0.0, 2.0]]])
    assert multiview_accuracy(views, torch.tensor([1]), ks=(1,))["top1"] == 100.0
    assert topk_accuracy(views.mean(dim=1), torch.tensor([1]), ks=(1,))["top1"] == 0.0


def test_multiview_matches_numpy(digits_scores: tuple[np.ndarray, np.ndarray]) -> None:
    scores, y = digits_scores
    rng = np.random.default_rng(0)
    views = scores[:, None, :] + rng.normal(0, 2.0, size=(scores.shape[0], 6, scores.shape[1]))
    e = np.exp(views - views.max(-1, keepdims=True))
    probs = (e / e.sum(-1, keepdims=True)).mean(1)
    out = multiview_accuracy(views, y, ks=(1, 5))
    assert out["top1"] == pytest.approx(100 * np.mean(probs.argmax(1) == y))
    assert out["top5"] == pytest.approx(100 * skm.top_k_accuracy_score(y, probs, k=5))


def test_classification_bad_input() -> None:
    with pytest.raises(MetricError, match="labels"):
        topk_accuracy(torch.zeros(3, 4), torch.tensor([0, 1]))
    with pytest.raises(MetricError, match=r"\[0, 3\]"):
        topk_accuracy(torch.zeros(2, 4), torch.tensor([0, 4]))
    with pytest.raises(UpctlError, match="3-D"):
        multiview_accuracy(torch.zeros(2, 4), torch.tensor([0, 1]))


# ------------------------------------------------------------------ retrieval


def _brute_force_ranks(q: np.ndarray, g: np.ndarray, positives: list[list[int]]) -> np.ndarray:
    sims = q @ g.T
    order = np.argsort(-sims, axis=1)
    ranks = []
    for i, pos in enumerate(positives):
        where = np.nonzero(np.isin(order[i], pos))[0]
        ranks.append(where.min())
    return np.asarray(ranks)


def _recalls(ranks: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    out = {f"R@{k}": 100.0 * float(np.mean(ranks < k)) for k in ks}
    out["MedR"] = float(np.median(ranks + 1))
    out["MeanR"] = float(np.mean(ranks + 1))
    return out


@pytest.mark.parametrize("nq,ng,d,chunk", [(37, 50, 8, 1), (37, 50, 8, 7), (64, 20, 4, 1000), (5, 300, 16, 2)])
def test_retrieval_recall_matches_brute_force(nq: int, ng: int, d: int, chunk: int) -> None:
    rng = np.random.default_rng(nq * 1000 + ng)
    q = rng.normal(size=(nq, d))
    g = rng.normal(size=(ng, d))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    positives = [sorted(rng.choice(ng, size=rng.integers(1, 4), replace=False).tolist()) for _ in range(nq)]
    ks = (1, 5, 10)
    got = retrieval_recall(torch.from_numpy(q).float(), torch.from_numpy(g).float(), positives, ks, chunk_size=chunk)
    want = _recalls(_brute_force_ranks(q, g, positives), ks)
    assert got == pytest.approx(want)
    # Single positive per query given as a 1-D index tensor.
    single = torch.from_numpy(rng.integers(0, ng, size=nq))
    got1 = retrieval_recall(q, g, single, ks, chunk_size=chunk)
    assert got1 == pytest.approx(_recalls(_brute_force_ranks(q, g, [[int(i)] for i in single]), ks))


def test_retrieval_hand_example() -> None:
    # Gallery on the unit circle at 0, 90, 180 degrees; queries near 10 and 100 degrees.
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    a, b = math.radians(10), math.radians(100)
    q = torch.tensor([[math.cos(a), math.sin(a)], [math.cos(b), math.sin(b)]])
    # query 0: order 0,1,2; its positive 2 is rank 3. query 1: order 1,2,0; positives {0, 2} -> best rank 2.
    out = retrieval_recall(q, g, [[2], [0, 2]], ks=(1, 2, 3))
    assert out == {"R@1": 0.0, "R@2": 50.0, "R@3": 100.0, "MedR": 2.5, "MeanR": 2.5}


def test_image_text_retrieval_matches_brute_force() -> None:
    rng = np.random.default_rng(3)
    ni, per, d = 30, 5, 12
    img = rng.normal(size=(ni, d))
    txt = np.repeat(img, per, axis=0) + rng.normal(scale=1.5, size=(ni * per, d))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    perm = rng.permutation(ni * per)  # captions not grouped by image
    txt, t2i = txt[perm], np.repeat(np.arange(ni), per)[perm]
    out = image_text_retrieval(torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(t2i), chunk_size=4)
    i2t = _recalls(_brute_force_ranks(img, txt, [np.nonzero(t2i == i)[0].tolist() for i in range(ni)]), (1, 5, 10))
    t2i_r = _recalls(_brute_force_ranks(txt, img, [[int(i)] for i in t2i]), (1, 5, 10))
    for k, v in i2t.items():
        assert out[f"i2t_{k}"] == pytest.approx(v)
    for k, v in t2i_r.items():
        assert out[f"t2i_{k}"] == pytest.approx(v)
    assert out["rsum"] == pytest.approx(sum(i2t[f"R@{k}"] + t2i_r[f"R@{k}"] for k in (1, 5, 10)))
    assert 0 < out["i2t_R@1"] < 100 and 0 < out["t2i_R@1"] < 100


def test_image_text_retrieval_hand_example() -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # captions 0,1 belong to image 0; 2,3 to image 1.
    txt = torch.tensor([[0.0, 1.0], [0.8, 0.6], [0.6, 0.8], [1.0, 0.0]])
    t2i = torch.tensor([0, 0, 1, 1])
    out = image_text_retrieval(img, txt, t2i, ks=(1, 2))
    # image 0 ranks captions 3 (1.0), 1 (0.8), 2, 0: best own caption (1) at rank 2.
    # image 1 ranks captions 0 (1.0), 2 (0.8), 1, 3: best own caption (2) at rank 2.
    assert out["i2t_R@1"] == 0.0 and out["i2t_R@2"] == 100.0
    # caption 0 -> image 1 first (miss); 1 -> image 0 (hit); 2 -> image 1 (hit); 3 -> image 0 (miss).
    assert out["t2i_R@1"] == 50.0 and out["t2i_R@2"] == 100.0
    assert out["rsum"] == 250.0


def test_retrieval_bad_input() -> None:
    with pytest.raises(MetricError, match="no positive"):
        retrieval_recall(torch.zeros(2, 3), torch.zeros(4, 3), [[1], []])
    with pytest.raises(MetricError, match="width"):
        retrieval_recall(torch.zeros(2, 3), torch.zeros(4, 5), [1, 2])
    with pytest.raises(MetricError, match=r"\[0, 3\]"):
        retrieval_recall(torch.zeros(2, 3), torch.zeros(4, 3), [[1], [7]])
    with pytest.raises(MetricError, match="no caption"):
        image_text_retrieval(torch.zeros(3, 2), torch.zeros(2, 2), torch.tensor([0, 0]))


# ------------------------------------------------------------------ GLUE


@pytest.fixture(scope="module")
def binary_preds() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_breast_cancer(return_X_y=True)
    clf = LogisticRegression(max_iter=200).fit(x[:300, :3], y[:300])  # weak on purpose: real errors
    return clf.predict(x[300:, :3]), y[300:]


def test_binary_metrics_match_sklearn(binary_preds: tuple[np.ndarray, np.ndarray]) -> None:
    p, y = binary_preds
    assert accuracy(p, y) == pytest.approx(skm.accuracy_score(y, p))
    assert f1_binary(p, y) == pytest.approx(skm.f1_score(y, p))
    assert f1_binary(p, y, pos_label=0) == pytest.approx(skm.f1_score(y, p, pos_label=0))
    assert matthews_corrcoef(p, y) == pytest.approx(skm.matthews_corrcoef(y, p))
    assert 0.3 < matthews_corrcoef(p, y) < 0.99
    assert f1_binary(torch.from_numpy(p), torch.from_numpy(y)) == pytest.approx(skm.f1_score(y, p))


def test_multiclass_mcc_and_degenerate(digits_scores: tuple[np.ndarray, np.ndarray]) -> None:
    scores, y = digits_scores
    p = scores.argmax(1)
    assert matthews_corrcoef(p, y) == pytest.approx(skm.matthews_corrcoef(y, p))
    assert matthews_corrcoef(np.ones(10, int), np.r_[np.ones(5, int), np.zeros(5, int)]) == 0.0
    assert f1_binary([0, 0, 0], [0, 0, 0]) == 0.0


def test_pearson_spearman_match_scipy() -> None:
    x, y = load_diabetes(return_X_y=True)  # integer targets: Spearman has real ties
    pred = LinearRegression().fit(x[:300, :2], y[:300]).predict(x[300:, :2])
    got = pearson_spearman(pred, y[300:])
    assert got["pearson"] == pytest.approx(stats.pearsonr(pred, y[300:])[0])
    assert got["spearman"] == pytest.approx(stats.spearmanr(pred, y[300:])[0])
    tied = [1, 2, 2, 3, 3, 3, 5]
    assert pearson_spearman(tied, [7, 1, 4, 4, 2, 9, 9])["spearman"] == pytest.approx(
        stats.spearmanr(tied, [7, 1, 4, 4, 2, 9, 9])[0])
    assert math.isnan(pearson_spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])["pearson"])


def test_glue_metrics_per_task(binary_preds: tuple[np.ndarray, np.ndarray]) -> None:
    p, y = binary_preds
    assert glue_metrics("MRPC", p, y) == pytest.approx(
        {"accuracy": 100 * skm.accuracy_score(y, p), "f1": 100 * skm.f1_score(y, p)})
    assert set(glue_metrics("qqp", p, y)) == {"accuracy", "f1"}
    assert glue_metrics("CoLA", p, y) == pytest.approx({"matthews_corrcoef": 100 * skm.matthews_corrcoef(y, p)})
    assert glue_metrics("SST-2", p, y) == pytest.approx({"accuracy": 100 * skm.accuracy_score(y, p)})
    assert glue_metrics("mnli-mm", [0, 1, 2, 2], [0, 1, 1, 2]) == {"accuracy": 75.0}
    sts = glue_metrics("STS-B", [0.5, 2.0, 3.5, 4.0], [1.0, 2.0, 3.0, 5.0])
    assert sts["pearson"] == pytest.approx(100 * stats.pearsonr([0.5, 2, 3.5, 4], [1, 2, 3, 5])[0])
    assert sts["spearman"] == pytest.approx(100.0)
    for task, key in GLUE_MAIN_METRIC.items():
        if task != "stsb":
            assert key in glue_metrics(task, p, y)
    with pytest.raises(MetricError, match="unknown"):
        glue_metrics("squad", p, y)
    with pytest.raises(MetricError, match="same length"):
        glue_metrics("rte", [0, 1], [0, 1, 1])
