"""Input checks shared by the metric functions: every metric accepts tensors, arrays or lists and
rejects a wrong shape, type or range with one line naming the argument."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from uniperceiver.errors import UpctlError


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

