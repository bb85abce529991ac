"""The symmetric image-text contrastive loss, plain and chunked.

Retrieval pre-training scores N images against their N captions: logits = scale x cosine similarity
[N, N], then cross entropy (optionally label-smoothed) in both directions, image -> caption (`i2t`,
over the rows) and caption -> image (`t2i`, over the columns); the task's loss is their sum.

`contrastive_loss` is that computation written plainly (the N x N logits, two `F.cross_entropy`
calls): the reference the chunked version is tested against. `chunked_contrastive_loss` gives the
same values and gradients without ever holding more than `chunk_size` x N logits: one pass over row
blocks yields both directions' log-sum-exps (the columns' as a running log-add-exp), the diagonal and
the smoothing terms; backward recomputes each block's logits from the features instead of keeping
them. With N <= chunk_size it is a single fused pass (one matmul, both directions read off it). It
matters when features are gathered from many ranks (the logits grow as (world x batch)^2 and the
plain loss keeps several fp32 copies of them for backward); at one GPU's batch it saves little.

Both return the two directions' losses and accuracies as tensors, so a training step can log them
without a host synchronisation (`.item()` each step stalls the GPU queue).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ContrastiveLoss", "chunked_contrastive_loss", "contrastive_loss"]


class ContrastiveLoss(NamedTuple):
    """Per-direction losses (differentiable) and top-1 accuracies (fractions in [0, 1], no gradient)."""

    i2t: Tensor
    t2i: Tensor
    acc_i2t: Tensor
    acc_t2i: Tensor

    @property
    def total(self) -> Tensor:
        """i2t + t2i: the reference sums the two directions (the recipes weight the task instead)."""
        return self.i2t + self.t2i


def _check(img: Tensor, txt: Tensor, label_smoothing: float) -> None:
    if img.dim() != 2 or img.shape != txt.shape:
        raise ValueError(f"expected image and text features of one shape [N, D], got {tuple(img.shape)} "
                         f"and {tuple(txt.shape)}")
    if img.shape[0] == 0:
        raise ValueError("contrastive loss over an empty batch")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")


def contrastive_loss(img: Tensor, txt: Tensor, scale: Tensor | float, label_smoothing: float = 0.0) -> ContrastiveLoss:
    """The plain symmetric loss over `scale * img @ txt.T` (row i's positive is column i).

    img, txt: [N, D] (L2-normalised features of the pairs, in matching order); scale: the temperature
    multiplier (a 0-dim tensor that may require grad, e.g. `model.logit_scale("retrieve")`).
    The logits are taken to fp32 before the cross entropies, as the retrieval task does.
    """
    _check(img, txt, label_smoothing)
    logits = (img @ txt.t() * scale).float()
    labels = torch.arange(logits.shape[0], device=logits.device)
    i2t = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    t2i = F.cross_entropy(logits.t(), labels, label_smoothing=label_smoothing)
    with torch.no_grad():
        acc_i2t = (logits.argmax(1) == labels).float().mean()
        acc_t2i = (logits.argmax(0) == labels).float().mean()
    return ContrastiveLoss(i2t, t2i, acc_i2t, acc_t2i)


def chunked_contrastive_loss(img: Tensor, txt: Tensor, scale: Tensor | float, label_smoothing: float = 0.0,
                             chunk_size: int = 1024) -> ContrastiveLoss:
    """`contrastive_loss` computed over blocks of `chunk_size` image rows: same values and gradients
    (for img, txt and scale), at most chunk_size x N logits alive at once, in forward and in backward.

    The math runs in fp32 whatever the features' dtype (bf16 features are upcast, not their bf16
    product), so under autocast it is slightly more precise than the plain loss, not bit-equal.
    """
    _check(img, txt, label_smoothing)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be at least 1")
    if not isinstance(scale, Tensor):
        scale = torch.tensor(float(scale), device=img.device)
    i2t, t2i, acc_i2t, acc_t2i = _ChunkedContrastive.apply(img, txt, scale, float(label_smoothing), int(chunk_size))
    return ContrastiveLoss(i2t, t2i, acc_i2t, acc_t2i)


class _ChunkedContrastive(torch.autograd.Function):
    """Forward and backward over row blocks (see `chunked_contrastive_loss`).

    With L = s * I T^T, P = row-softmax(L), Q = column-softmax(L), e = label smoothing and the two
    upstream gradients a (of i2t) and b (of t2i): dLoss/dL = (a/N)(P - Y) + (b/N)(Q - Y) where
    Y = (1 - e) * identity + e/N. Then dI = s * G T, dT = s * G^T I and ds = sum(G * I T^T).
    """

    @staticmethod
    def forward(ctx: Any, img: Tensor, txt: Tensor, scale: Tensor, label_smoothing: float,
                chunk_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        with torch.autocast(img.device.type, enabled=False):
            i32, t32, s = img.float(), txt.float(), scale.float()
            n = i32.shape[0]
            row_lse = i32.new_empty(n)
            col_lse = i32.new_full((n,), float("-inf"))
            col_best = i32.new_full((n,), float("-inf"))
            col_arg = torch.zeros(n, dtype=torch.long, device=i32.device)
            diag = i32.new_zeros(())
            total = i32.new_zeros(())
            hits_i2t = i32.new_zeros(())
            for start in range(0, n, chunk_size):
                stop = min(start + chunk_size, n)
                logits = (i32[start:stop] @ t32.t()) * s  # [c, N]
                rows = torch.arange(stop - start, device=i32.device)
                own = rows + start
                row_lse[start:stop] = torch.logsumexp(logits, dim=1)
                col_lse = torch.logaddexp(col_lse, torch.logsumexp(logits, dim=0))
                diag = diag + logits[rows, own].sum()
                total = total + logits.sum()
                hits_i2t = hits_i2t + (logits.argmax(dim=1) == own).sum()
                # Running column argmax; strict > keeps the first maximum, as argmax over the whole does.
                best, arg = logits.max(dim=0)
                better = best > col_best
                col_best = torch.where(better, best, col_best)
                col_arg = torch.where(better, arg + start, col_arg)
            e = label_smoothing
            i2t = (row_lse.sum() - (1.0 - e) * diag - (e / n) * total) / n
            t2i = (col_lse.sum() - (1.0 - e) * diag - (e / n) * total) / n
            acc_i2t = hits_i2t / n
            acc_t2i = (col_arg == torch.arange(n, device=i32.device)).float().mean()
        ctx.save_for_backward(img, txt, scale, row_lse, col_lse)
        ctx.label_smoothing = label_smoothing
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(acc_i2t, acc_t2i)
        return i2t, t2i, acc_i2t, acc_t2i

    @staticmethod
    def backward(ctx: Any, g_i2t: Tensor, g_t2i: Tensor, _g_acc_i2t: Tensor, _g_acc_t2i: Tensor
                 ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        img, txt, scale, row_lse, col_lse = ctx.saved_tensors
        e, chunk_size = ctx.label_smoothing, ctx.chunk_size
        with torch.autocast(img.device.type, enabled=False):
            i32, t32, s = img.float(), txt.float(), scale.float()
            n = i32.shape[0]
            a, b = g_i2t.float() / n, g_t2i.float() / n
            off_diagonal = (a + b) * (e / n)  # the smoothing share of Y, in every entry
            on_diagonal = (a + b) * (1.0 - e)  # the positive's share, on the diagonal only
            grad_i = torch.empty_like(i32)
            grad_t = torch.zeros_like(t32)
            grad_s = i32.new_zeros(())
            for start in range(0, n, chunk_size):
                stop = min(start + chunk_size, n)
                sims = i32[start:stop] @ t32.t()
                logits = sims * s
                g = a * torch.exp(logits - row_lse[start:stop, None]) + b * torch.exp(logits - col_lse[None, :])
                g = g - off_diagonal
                rows = torch.arange(stop - start, device=i32.device)
                g[rows, rows + start] -= on_diagonal
                grad_i[start:stop] = (g @ t32) * s
                grad_t += (g.t() @ i32[start:stop]) * s
                grad_s = grad_s + (g * sims).sum()
        need_i, need_t, need_s = ctx.needs_input_grad[:3]
        return (grad_i.to(img.dtype) if need_i else None,
                grad_t.to(txt.dtype) if need_t else None,
                grad_s.to(scale.dtype).reshape(scale.shape) if need_s else None,
                None, None)
