"""Retrieval Recall@K in percent in both directions on normalised features, with the Karpathy-style
rule that an image query is a hit if ANY of its captions is in the top k. Ranks are computed in
tiles, so 25k captions x 5k images never become one tensor."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from uniperceiver.metrics._arrays import MetricError, _as_tensor, _check_ks, _float_scores, _int_labels


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

