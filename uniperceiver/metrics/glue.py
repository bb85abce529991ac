"""GLUE metrics: accuracy, F1 (MRPC, QQP), Matthews correlation (CoLA), Pearson/Spearman (STS-B)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from uniperceiver.metrics._arrays import MetricError


def _pair_1d(preds: Any, labels: Any, *, floats: bool = False) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(preds.detach().cpu() if isinstance(preds, torch.Tensor) else preds)
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if p.ndim != 1 or y.ndim != 1 or p.shape != y.shape:
        raise MetricError(f"preds and labels must be 1-D of the same length, got shapes {p.shape} and {y.shape}")
    if p.size == 0:
        raise MetricError("preds: no samples")
    if floats:
        try:
            return p.astype(np.float64), y.astype(np.float64)
        except ValueError as exc:
            raise MetricError(f"preds/labels: expected numbers ({exc})") from exc
    return p, y


def accuracy(preds: Any, labels: Any) -> float:
    """Fraction (0..1) of predictions equal to the labels (sklearn `accuracy_score`)."""
    p, y = _pair_1d(preds, labels)
    return float(np.mean(p == y))


def f1_binary(preds: Any, labels: Any, pos_label: Any = 1) -> float:
    """Binary F1 (0..1) of the positive class, 2TP / (2TP + FP + FN); 0.0 when undefined.

    MRPC and QQP report F1 of the "paraphrase / duplicate" class (label 1) because the classes
    are unbalanced; this matches sklearn `f1_score(average="binary")` with zero_division=0.
    """
    p, y = _pair_1d(preds, labels)
    tp = int(np.sum((p == pos_label) & (y == pos_label)))
    fp = int(np.sum((p == pos_label) & (y != pos_label)))
    fn = int(np.sum((p != pos_label) & (y == pos_label)))
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2.0 * tp / denom


def matthews_corrcoef(preds: Any, labels: Any) -> float:
    """Matthews correlation (-1..1), the CoLA metric (robust to its 70/30 class imbalance).

    Uses the multiclass confusion-matrix form (Gorodkin 2004), identical to the binary formula
    for two classes and to sklearn `matthews_corrcoef`; 0.0 when a marginal is constant.
    """
    p, y = _pair_1d(preds, labels)
    classes, inv = np.unique(np.concatenate([y, p]), return_inverse=True)
    yi, pi = inv[: y.size], inv[y.size:]
    k = classes.size
    cm = np.zeros((k, k), dtype=np.float64)
    np.add.at(cm, (yi, pi), 1.0)
    t_sum = cm.sum(axis=1)
    p_sum = cm.sum(axis=0)
    n_correct = np.trace(cm)
    n = cm.sum()
    cov_ytyp = n_correct * n - np.dot(t_sum, p_sum)
    cov_ypyp = n * n - np.dot(p_sum, p_sum)
    cov_ytyt = n * n - np.dot(t_sum, t_sum)
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return float(cov_ytyp / np.sqrt(cov_ytyt * cov_ypyp))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (scipy `rankdata(method="average")`)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    boundaries = np.concatenate([[True], xs[1:] != xs[:-1], [True]])
    idx = np.flatnonzero(boundaries)
    ranks_sorted = np.empty(x.size, dtype=np.float64)
    for a, b in zip(idx[:-1], idx[1:]):
        ranks_sorted[a:b] = (a + 1 + b) / 2.0  # mean of ranks a+1 .. b
    ranks = np.empty_like(ranks_sorted)
    ranks[order] = ranks_sorted
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt(np.dot(a, a) * np.dot(b, b))
    if denom == 0:
        return float("nan")
    return float(np.clip(np.dot(a, b) / denom, -1.0, 1.0))


def pearson_spearman(preds: Any, labels: Any) -> dict[str, float]:
    """Pearson and Spearman correlations (-1..1) for STS-B similarity scores.

    Spearman is the Pearson correlation of average ranks (as scipy `spearmanr`). Both are NaN when
    either side is constant (the correlation is undefined), as scipy returns.
    """
    p, y = _pair_1d(preds, labels, floats=True)
    if p.size < 2:
        raise MetricError(f"preds: correlation needs at least 2 samples, got {p.size}")
    return {"pearson": _pearson(p, y), "spearman": _pearson(_average_ranks(p), _average_ranks(y))}


_GLUE_ALIASES = {
    "cola": "cola", "sst2": "sst2", "sst-2": "sst2", "mrpc": "mrpc", "qqp": "qqp",
    "stsb": "stsb", "sts-b": "stsb", "mnli": "mnli", "mnli-m": "mnli", "mnli_m": "mnli",
    "mnli-matched": "mnli", "mnli-mm": "mnli", "mnli_mm": "mnli", "mnli-mismatched": "mnli",
    "qnli": "qnli", "rte": "rte", "wnli": "wnli", "ax": "ax",
}
GLUE_TASKS: tuple[str, ...] = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli", "ax")
#: The number papers (and the Uni-Perceiver README) quote for each task.
GLUE_MAIN_METRIC: Mapping[str, str] = {
    "cola": "matthews_corrcoef", "sst2": "accuracy", "mrpc": "f1", "qqp": "f1", "stsb": "spearman",
    "mnli": "accuracy", "qnli": "accuracy", "rte": "accuracy", "wnli": "accuracy", "ax": "matthews_corrcoef",
}


def glue_metrics(task_name: str, preds: Any, labels: Any) -> dict[str, float]:
    """The official GLUE metrics of one task, scaled by 100 as on the leaderboard and in the paper.

    MRPC, QQP: accuracy and F1 of class 1; CoLA (and the AX diagnostic): Matthews correlation;
    STS-B: Pearson and Spearman of the predicted scores; every other task: accuracy. `preds` are
    predicted class ids (the argmax over the cloze candidates), or real scores for STS-B.
    `GLUE_MAIN_METRIC[task]` names the headline number.
    """
    key = _GLUE_ALIASES.get(str(task_name).strip().lower())
    if key is None:
        raise MetricError(f"glue task {task_name!r} is unknown; expected one of {', '.join(GLUE_TASKS)}")
    if key == "stsb":
        return {k: 100.0 * v for k, v in pearson_spearman(preds, labels).items()}
    if key in ("cola", "ax"):
        return {"matthews_corrcoef": 100.0 * matthews_corrcoef(preds, labels)}
    out = {"accuracy": 100.0 * accuracy(preds, labels)}
    if key in ("mrpc", "qqp"):
        out["f1"] = 100.0 * f1_binary(preds, labels)
    return out
