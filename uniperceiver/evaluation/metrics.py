"""Classification, retrieval and GLUE metrics, computed the way the Uni-Perceiver paper reports them.

Only torch and numpy are used, so these run anywhere the model runs (CPU or GPU) and need no
extra dependency. Conventions (see docs/reference facts, "Downstream" / "Metrics"):

- classification: top-1 / top-5 accuracy in percent (ImageNet, Kinetics);
- video: several views per clip (temporal x spatial crops), softmax per view, averaged;
- retrieval: Recall@1/5/10 in percent in both directions on the normalised features, with the
  Karpathy-style rule that an image query is a hit if ANY of its captions is in the top k;
- GLUE: accuracy, F1 (MRPC, QQP), Matthews correlation (CoLA), Pearson/Spearman (STS-B).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from uniperceiver.errors import UpctlError

__all__ = [
    "MetricError",
    "topk_accuracy",
    "multiview_accuracy",
    "retrieval_recall",
    "image_text_retrieval",
    "accuracy",
    "f1_binary",
    "matthews_corrcoef",
    "pearson_spearman",
    "glue_metrics",
    "GLUE_TASKS",
    "GLUE_MAIN_METRIC",
]


class MetricError(UpctlError):
    """Inputs to a metric have the wrong shape, type or range, or a tool the metric needs is missing."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as exc:
        raise MetricError(f"{name}: cannot convert {type(x).__name__} to a tensor ({exc})") from exc


def _float_scores(x: Any, name: str, ndim: int) -> torch.Tensor:
    t = _as_tensor(x, name)
    if t.ndim != ndim:
        raise MetricError(f"{name}: expected a {ndim}-D array, got shape {tuple(t.shape)}")
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise MetricError(f"{name}: expected real-valued scores, got dtype {t.dtype}")
    # float16/bfloat16 matmuls are slow or unsupported on CPU and lose ranking precision.
    return t.double() if t.dtype == torch.float64 else t.float()


def _int_labels(x: Any, name: str, n: int, num_classes: int | None = None) -> torch.Tensor:
    t = _as_tensor(x, name)
    if t.ndim != 1 or t.shape[0] != n:
        raise MetricError(f"{name}: expected shape ({n},), got {tuple(t.shape)}")
    if t.is_floating_point():
        if not torch.equal(t, t.round()):
            raise MetricError(f"{name}: expected integer class ids, got non-integer values")
    elif t.dtype == torch.bool:
        t = t.long()
    t = t.long()
    if num_classes is not None and n > 0:
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= num_classes:
            raise MetricError(f"{name}: class ids must be in [0, {num_classes - 1}], got range [{lo}, {hi}]")
    return t


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise MetricError(f"ks: expected positive integers, got {ks}")
    return ks


# --------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------


def topk_accuracy(logits: Any, labels: Any, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent: ``{"top1": .., "top5": ..}``.

    `logits` is [N, C] (logits, probabilities or any monotone score; only the ranking matters),
    `labels` is [N] class ids. A sample counts for top-k when its label is among the k highest
    scores. As in timm's `accuracy` (used by the reference code), k larger than C is clamped to C,
    so top-5 on a 3-class problem is 100%. Ties are broken by `torch.topk`.
    """
    ks = _check_ks(ks)
    scores = _float_scores(logits, "logits", 2)
    n, c = scores.shape
    y = _int_labels(labels, "labels", n, c)
    if n == 0:
        raise MetricError("logits: no samples (N = 0)")
    if c == 0:
        raise MetricError("logits: no classes (C = 0)")
    maxk = min(max(ks), c)
    top = scores.topk(maxk, dim=1).indices  # [N, maxk]
    hit = top.eq(y.to(top.device).unsqueeze(1))  # [N, maxk]
    out: dict[str, float] = {}
    for k in ks:
        kk = min(k, c)
        out[f"top{k}"] = float(hit[:, :kk].any(dim=1).double().mean().item() * 100.0)
    return out


def multiview_accuracy(view_logits: Any, labels: Any, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Multi-view (multi-crop) top-k accuracy in percent for [N, V, C] view logits.

    Video classification is evaluated on V views per clip (Kinetics: 4 temporal x 3 spatial).
    Following the reference code, each view's logits go through a softmax first and the V
    probability vectors are averaged; averaging raw logits would let one confident view dominate.
    """
    scores = _float_scores(view_logits, "view_logits", 3)
    if scores.shape[1] == 0:
        raise MetricError("view_logits: no views (V = 0)")
    probs = scores.softmax(dim=-1).mean(dim=1)
    return topk_accuracy(probs, labels, ks)


# --------------------------------------------------------------------------------------------
# retrieval
# --------------------------------------------------------------------------------------------


def _positives_matrix(query_to_gallery: Any, nq: int, ng: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the positive gallery ids of every query into [Nq, P] plus a validity mask."""
    if isinstance(query_to_gallery, (torch.Tensor, np.ndarray)):
        t = _as_tensor(query_to_gallery, "query_to_gallery")
        if t.ndim == 1:
            t = t.unsqueeze(1)
        if t.ndim != 2 or t.shape[0] != nq:
            raise MetricError(f"query_to_gallery: expected {nq} rows, got shape {tuple(t.shape)}")
        pos = _int_labels(t.reshape(-1), "query_to_gallery", t.numel(), ng).view(t.shape)
        return pos, torch.ones_like(pos, dtype=torch.bool)
    rows = list(query_to_gallery)
    if len(rows) != nq:
        raise MetricError(f"query_to_gallery: expected {nq} entries (one per query), got {len(rows)}")
    lists: list[list[int]] = []
    for i, r in enumerate(rows):
        scalar = isinstance(r, (int, np.integer)) or getattr(r, "ndim", None) == 0
        ids = [int(r)] if scalar else [int(v) for v in r]
        if not ids:
            raise MetricError(f"query_to_gallery[{i}]: query has no positive gallery item")
        bad = [v for v in ids if v < 0 or v >= ng]
        if bad:
            raise MetricError(f"query_to_gallery[{i}]: gallery ids must be in [0, {ng - 1}], got {bad[:5]}")
        lists.append(ids)
    width = max((len(x) for x in lists), default=1)
    pos = torch.zeros(nq, width, dtype=torch.long)
    mask = torch.zeros(nq, width, dtype=torch.bool)
    for i, ids in enumerate(lists):
        pos[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, : len(ids)] = True
    return pos, mask


def _best_positive_ranks(q: torch.Tensor, g: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
                         chunk_size: int) -> torch.Tensor:
    """0-based rank of the best-ranked positive of every query, in tiles of chunk_size x chunk_size.

    Rank = number of gallery items scoring strictly higher than the best positive (ties count in the
    query's favour). Both queries and gallery are tiled, so memory stays flat in the number of
    candidates: pass 1 finds each query's best positive score, pass 2 counts the gallery items above
    it. Every score comes from the same tile product in both passes, so the comparison is exact.
    """
    nq, ng = q.shape[0], g.shape[0]
    ranks = torch.empty(nq, dtype=torch.long)
    pos = pos.to(q.device)
    mask = mask.to(q.device)
    # Gallery tiles are wider than query tiles (fewer, larger matmuls). Every tile's scores and
    # comparisons are written into the same two preallocated buffers: a fresh multi-MB tensor per
    # tile made the process's footprint grow with the number of tiles (allocator fragmentation).
    width = 8 * chunk_size
    tiles = [(gs, min(gs + width, ng)) for gs in range(0, ng, width)]
    score_buf = torch.empty(min(chunk_size, nq) * min(width, ng), dtype=q.dtype, device=q.device)
    above_buf = torch.empty(score_buf.shape, dtype=torch.bool, device=q.device)

    def scores(qc: torch.Tensor, gs: int, ge: int) -> torch.Tensor:
        out = score_buf[: qc.shape[0] * (ge - gs)].view(qc.shape[0], ge - gs)
        return torch.mm(qc, g[gs:ge].t(), out=out)

    for start in range(0, nq, chunk_size):
        stop = min(start + chunk_size, nq)
        qc = q[start:stop]
        p, m = pos[start:stop], mask[start:stop]
        best = torch.full((stop - start,), float("-inf"), dtype=q.dtype, device=q.device)
        for gs, ge in tiles:
            inside = m & (p >= gs) & (p < ge)
            if not bool(inside.any()):
                continue
            local = (p - gs).clamp(0, ge - gs - 1)
            cand = scores(qc, gs, ge).gather(1, local).masked_fill(~inside, float("-inf"))
            best = torch.maximum(best, cand.max(dim=1).values)
        count = torch.zeros(stop - start, dtype=torch.long, device=q.device)
        for gs, ge in tiles:
            sims = scores(qc, gs, ge)
            above = torch.gt(sims, best.unsqueeze(1), out=above_buf[: sims.numel()].view(sims.shape))
            # int32 partial sums: a bool -> int64 sum materialised a 64-bit copy of every tile.
            count += above.sum(dim=1, dtype=torch.int32)
        ranks[start:stop] = count.cpu()
    return ranks


def _recall_from_ranks(ranks: torch.Tensor, ks: tuple[int, ...], prefix: str = "") -> dict[str, float]:
    out = {f"{prefix}R@{k}": float((ranks < k).double().mean().item() * 100.0) for k in ks}
    r1 = ranks.double() + 1.0
    out[f"{prefix}MedR"] = float(np.median(r1.numpy()))
    out[f"{prefix}MeanR"] = float(r1.mean().item())
    return out


def retrieval_recall(query_feats: Any, gallery_feats: Any, query_to_gallery: Any,
                     ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024) -> dict[str, float]:
    """Recall@k (percent) plus median / mean rank (1-based) for retrieval of gallery items.

    Scores are dot products of the features as given: pass L2-normalised features (what the model
    outputs), so they are cosine similarities, without temperature (the reference convention).
    `query_to_gallery` gives the positives of every query: a list of lists of gallery ids, or a
    1-D integer array / list of ints when every query has exactly one positive. A query is a hit
    at k when ANY of its positives is among the k best-scored gallery items. The Nq x Ng score
    matrix is never built: query rows are scored `chunk_size` at a time.
    """
    ks = _check_ks(ks)
    if int(chunk_size) < 1:
        raise MetricError(f"chunk_size: expected a positive integer, got {chunk_size}")
    q = _float_scores(query_feats, "query_feats", 2)
    g = _float_scores(gallery_feats, "gallery_feats", 2).to(device=q.device, dtype=q.dtype)
    if q.shape[1] != g.shape[1]:
        raise MetricError(f"query_feats has width {q.shape[1]} but gallery_feats has width {g.shape[1]}")
    if q.shape[0] == 0 or g.shape[0] == 0:
        raise MetricError(f"retrieval needs at least one query and one gallery item, got {q.shape[0]} and {g.shape[0]}")
    pos, mask = _positives_matrix(query_to_gallery, q.shape[0], g.shape[0])
    ranks = _best_positive_ranks(q, g, pos, mask, int(chunk_size))
    return _recall_from_ranks(ranks, ks)


def image_text_retrieval(img_feats: Any, txt_feats: Any, txt_to_img: Any,
                         ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024) -> dict[str, float]:
    """Image-to-text and text-to-image Recall@k (percent) and their sum ``rsum``.

    The standard Karpathy-split evaluation (COCO 5k / Flickr30k 1k test images, about 5
    captions each): `txt_to_img[t]` is the image of caption t. Image-to-text counts a hit when
    ANY of the image's captions is in the top k; text-to-image has one correct image per caption.
    Returns ``i2t_R@k``, ``t2i_R@k`` for every k, ``i2t_MedR``/``t2i_MedR``/``..._MeanR`` and
    ``rsum`` = the sum of all the R@k values (the usual single-number summary).
    """
    ks = _check_ks(ks)
    img = _float_scores(img_feats, "img_feats", 2)
    txt = _float_scores(txt_feats, "txt_feats", 2)
    t2i = _int_labels(txt_to_img, "txt_to_img", txt.shape[0], img.shape[0])
    ni = img.shape[0]
    counts = torch.bincount(t2i, minlength=ni)
    if ni and int((counts == 0).sum()) > 0:
        missing = torch.nonzero(counts == 0).flatten()[:5].tolist()
        raise MetricError(f"txt_to_img: {int((counts == 0).sum())} image(s) have no caption, e.g. images {missing}")
    owner = t2i.cpu().tolist()  # python ints: no per-element device sync on GPU
    i2t_lists: list[list[int]] = [[] for _ in range(ni)]
    for t, i in enumerate(owner):
        i2t_lists[i].append(t)
    out: dict[str, float] = {}
    out.update({f"i2t_{k}": v for k, v in retrieval_recall(img, txt, i2t_lists, ks, chunk_size).items()})
    out.update({f"t2i_{k}": v for k, v in retrieval_recall(txt, img, t2i, ks, chunk_size).items()})
    out["rsum"] = float(sum(out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks))
    return out


# --------------------------------------------------------------------------------------------
# GLUE
# --------------------------------------------------------------------------------------------


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
