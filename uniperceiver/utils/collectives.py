"""One differentiable all-gather, for the features every rank must see (target sets, retrieval).

Why our own: `torch.distributed.nn.functional.all_gather` is deprecated (a FutureWarning on every
rank, every run) and the functional-collectives replacements are private and renamed between
releases. This is a small `torch.autograd.Function` over the public, stable collectives:

- forward: every rank's tensor concatenated along dim 0 (one single-tensor all-gather);
- backward: rank r's input rows appear once in every rank's output, and every rank computed its own
  loss from them, so their gradient is the SUM over ranks of the incoming gradient's slice r. On
  NCCL that is one reduce-scatter; on other backends (gloo, whose reduce-scatter support depends on
  the torch release) an all-reduce of the whole gradient followed by taking slice r. Both give what
  the deprecated function gave (its gloo path summed an all-to-all, its NCCL path reduce-scattered).

Every rank must call it with a tensor of the same shape, and every rank's backward must reach it
(a rank that does not use the output still needs a zero-weighted term that does).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

# torch 2.14 renamed the single-tensor collectives (the old names warn); torch >= 2.4 is supported.
_ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER_SINGLE = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _world(group: Any) -> int:
    """The group's size, or 1 when there is no process group (a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: concatenate every rank's tensor along dim 0. Backward: sum this rank's slice over ranks."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        world = dist.get_world_size(group)
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.rows = tensor.shape[0]
        out = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))
        _ALL_GATHER_SINGLE(out, tensor.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            mine = grad.new_empty((ctx.rows, *grad.shape[1:]))
            _REDUCE_SCATTER_SINGLE(mine, grad, op=dist.ReduceOp.SUM, group=ctx.group)
            return mine, None
        total = grad.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows].contiguous(), None


def all_gather_with_grad(tensor: Tensor, group: Any = None) -> Tensor:
    """`tensor` of every rank of `group`, concatenated along dim 0 in rank order, with gradients.

    Identity (the same tensor object) without a process group or in a group of one.
    """
    if _world(group) == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor, group)


__all__ = ["all_gather_with_grad"]
