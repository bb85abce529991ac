"""Attention masks of the unified layouts (bool, True = may attend)."""

from __future__ import annotations

import torch
from torch import Tensor


def caption_mask(context: int, text_len: int, device: torch.device | str | None = None) -> Tensor:
    """The captioning training mask for `[SPE + visual (context tokens)] + words(T) + queries(T)`.

    Every row sees the context; context rows see no text; word i sees words <= i; query i sees
    words < i and itself. Shape [S, S] with S = context + 2 T. Query i predicts word i.
    """
    t = text_len
    s = context + 2 * t
    mask = torch.zeros(s, s, dtype=torch.bool, device=device)
    mask[:, :context] = True
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool, device=device))
    words = slice(context, context + t)
    queries = slice(context + t, s)
    mask[words, words] = causal
    mask[queries, words] = torch.tril(torch.ones(t, t, dtype=torch.bool, device=device), diagonal=-1)
    mask[queries, queries] = torch.eye(t, dtype=torch.bool, device=device)
    return mask
