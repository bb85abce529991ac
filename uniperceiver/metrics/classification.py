"""Classification accuracy the way the Uni-Perceiver paper reports it: top-1 / top-5 in percent
(ImageNet, Kinetics); video scores several views per clip (temporal x spatial crops) with a softmax
per view, averaged."""

from __future__ import annotations

from typing import Any, Sequence


from uniperceiver.metrics._arrays import MetricError, _check_ks, _float_scores, _int_labels


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

