"""Caption decoding: beam search over the vocabulary target set, on the encoder's KV cache.

The reference (`CaptionBeamSearcherV3`) encodes `[SPE] + visual` once and keeps every layer's input
as a cache. Step t feeds one `<|spe|>` query at text position t (no SPE prefix); the query's output
is scored against the encoded vocabulary (cosine x the "caption" temperature), log-softmaxed, and
added to the beam's log-probability. The best `beam_size` (beam, word) pairs over all beams are
kept (step 0 starts from one beam); the chosen word is then encoded at position t against the
cache and appended to it. Here the word of step t-1 and the query of step t go through ONE
`model.extend` call (the word cannot see the query; both see the cache), which gives the same
numbers with half the calls.

A beam that has produced `<|endoftext|>` is frozen: its only continuation is EOT at an unchanged
score (the reference masks every other word with -999). The reference always runs `max_len` steps;
we stop as soon as every beam is frozen, which selects the same beams. Final ranking: the
log-probability, divided by `(number of non-EOT tokens + 1) ** length_penalty` when
length_penalty > 0 (the reference rule; not GNMT's ((5 + len) / 6) ** lp). Returned sequences stop
before the first EOT.

`decode_uncached` recomputes the whole teacher-forced caption layout
(`[SPE] + visual + words + queries` with `caption_mask`) at every step: the same search without a
cache, for equality tests and benchmarks. Both need the model in eval mode (DropPath off).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from uniperceiver.errors import ConfigError
from uniperceiver.modeling.masks import caption_mask
from uniperceiver.modeling.model import Segment, TextSegment, UniPerceiver, VisualSegment
from uniperceiver.tokenizers.text import EOT_ID, SPE_ID

__all__ = ["beam_search", "decode_uncached"]

#: step(t, prev_words [rows] token ids or None at t = 0) -> query features [rows, D] (normalised)
StepFn = Callable[[int, "Tensor | None"], Tensor]
#: reorder(index [new_rows]) -> None: select / repeat rows of the decoder's state
ReorderFn = Callable[[Tensor], None]


def _vocab(vocab_feats: Tensor, vocab_ids: Tensor | Sequence[int] | None, eos_id: int, beam_size: int) -> tuple[Tensor, int]:
    n = vocab_feats.shape[0]
    ids = torch.arange(n) if vocab_ids is None else torch.as_tensor(vocab_ids, dtype=torch.long).flatten()
    if ids.shape[0] != n:
        raise ConfigError(f"vocab_ids has {ids.shape[0]} entries for {n} vocabulary features")
    hits = (ids == eos_id).nonzero().flatten()
    if hits.numel() == 0:
        raise ConfigError(f"the end token {eos_id} is not in the decoding vocabulary")
    if beam_size < 1 or beam_size > n:
        raise ConfigError(f"beam_size={beam_size} must be in [1, vocabulary size {n}]")
    return ids.to(vocab_feats.device), int(hits[0])


def _search(
    batch: int,
    step: StepFn,
    reorder: ReorderFn,
    model: UniPerceiver,
    vocab_feats: Tensor,
    vocab_ids: Tensor | Sequence[int] | None,
    *,
    beam_size: int,
    max_len: int,
    length_penalty: float,
    eos_id: int,
    scale: str | None,
) -> list[list[int]]:
    """The beam search shared by the cached and uncached decoders (see the module docstring)."""
    if max_len < 1:
        raise ConfigError(f"max_len={max_len} must be >= 1")
    ids, eos = _vocab(vocab_feats, vocab_ids, eos_id, beam_size)
    dev = vocab_feats.device
    v = vocab_feats.shape[0]
    seq_logp = torch.zeros(batch, 1, device=dev)
    done = torch.zeros(batch, 1, dtype=torch.bool, device=dev)
    words = torch.zeros(batch, 1, 0, dtype=torch.long, device=dev)  # vocabulary indices
    prev: Tensor | None = None
    for t in range(max_len):
        cur = 1 if t == 0 else beam_size
        q = step(t, prev)  # [batch * cur, D]
        logp = F.log_softmax(model.logits(q, vocab_feats, scale).float(), dim=-1).view(batch, cur, v)
        cand = seq_logp.unsqueeze(-1) + logp
        if t > 0 and bool(done.any()):
            frozen = torch.full_like(cand, float("-inf"))
            frozen[..., eos] = seq_logp
            cand = torch.where(done.unsqueeze(-1), frozen, cand)
        top = cand.view(batch, cur * v).topk(beam_size, dim=1)
        beam = torch.div(top.indices, v, rounding_mode="floor")  # [batch, beam]
        word = top.indices - beam * v
        rows = (torch.arange(batch, device=dev).unsqueeze(1) * cur + beam).flatten()
        reorder(rows)
        seq_logp = top.values
        done = torch.gather(done, 1, beam) | (word == eos)
        words = torch.cat([torch.gather(words, 1, beam.unsqueeze(-1).expand(-1, -1, words.shape[2])), word.unsqueeze(-1)], 2)
        prev = ids[word.flatten()]
        if bool(done.all()):
            break
    score = seq_logp
    if length_penalty > 0:
        length = (words != eos).sum(-1).float() + 1.0
        score = score / length.pow(length_penalty)
    best = score.argmax(dim=1)
    out: list[list[int]] = []
    for b in range(batch):
        seq = words[b, int(best[b])].tolist()
        if eos in seq:
            seq = seq[: seq.index(eos)]
        out.append([int(ids[i]) for i in seq])
    return out


def _select(segments: Sequence[Segment], index: Tensor) -> list[Segment]:
    out: list[Segment] = []
    for seg in segments:
        if isinstance(seg, VisualSegment):
            out.append(VisualSegment(seg.pixels.index_select(0, index.to(seg.pixels.device))))
        else:
            i = index.to(seg.ids.device)
            pos = seg.positions
            if pos is not None and pos.dim() == 2:
                pos = pos.index_select(0, i)
            valid = None if seg.valid is None else seg.valid.index_select(0, i)
            out.append(TextSegment(seg.ids.index_select(0, i), valid, pos))
    return out


def _batch(segments: Sequence[Segment]) -> int:
    seg = segments[0]
    return seg.pixels.shape[0] if isinstance(seg, VisualSegment) else seg.ids.shape[0]


@torch.no_grad()
def beam_search(
    model: UniPerceiver,
    visual_segments: Sequence[Segment],
    vocab_feats: Tensor,
    vocab_ids: Tensor | Sequence[int] | None = None,
    *,
    beam_size: int = 2,
    max_len: int = 21,
    length_penalty: float = 0.0,
    eos_id: int = EOT_ID,
    scale: str | None = "caption",
) -> list[list[int]]:
    """Decode one caption per sample with the KV cache: a list of token ids per sample (no EOT).

    `visual_segments`: the context after the SPE prefix (usually one VisualSegment [B, ...]).
    `vocab_feats` [V, D]: the encoded vocabulary target set; `vocab_ids` [V]: the token id of each
    row (None: row v is token v, the full 49,411-entry set). Greedy decoding is beam_size=1.
    """
    if not visual_segments:
        raise ConfigError("beam_search needs at least one context segment (the image or video)")
    dev = model.device
    batch = _batch(visual_segments)
    state = {"cache": model.prefill(list(visual_segments))}
    spe = torch.full((1, 1), SPE_ID, dtype=torch.long, device=dev)

    def step(t: int, prev: Tensor | None) -> Tensor:
        cache = state["cache"]
        if prev is None:
            h, _ = model.extend(cache, spe.expand(cache.keys[0].shape[0], 1), torch.tensor([0], device=dev))
            return model.read_out(h[:, -1:])
        rows = prev.shape[0]
        ids = torch.stack([prev.to(dev), torch.full((rows,), SPE_ID, dtype=torch.long, device=dev)], 1)
        mask = torch.ones(1, 2, cache.length + 2, dtype=torch.bool, device=dev)
        mask[0, 0, -1] = False  # the word does not see the query
        h, state["cache"] = model.extend(cache, ids, torch.tensor([t - 1, t], device=dev), attn_mask=mask, append=1)
        return model.read_out(h[:, -1:])

    def reorder(index: Tensor) -> None:
        state["cache"] = state["cache"].reorder(index.to(dev))

    return _search(batch, step, reorder, model, vocab_feats.to(dev), vocab_ids, beam_size=beam_size,
                   max_len=max_len, length_penalty=length_penalty, eos_id=eos_id, scale=scale)


@torch.no_grad()
def decode_uncached(
    model: UniPerceiver,
    visual_segments: Sequence[Segment],
    vocab_feats: Tensor,
    vocab_ids: Tensor | Sequence[int] | None = None,
    *,
    beam_size: int = 2,
    max_len: int = 21,
    length_penalty: float = 0.0,
    eos_id: int = EOT_ID,
    scale: str | None = "caption",
) -> list[list[int]]:
    """The same search, recomputing `[SPE] + context + words(t+1) + queries(t+1)` at every step t.

    Query t sees only the context and words < t, so the word slot t holds a dummy token (0).
    """
    if not visual_segments:
        raise ConfigError("decode_uncached needs at least one context segment (the image or video)")
    dev = model.device
    batch = _batch(visual_segments)
    patch = model.cfg.patch_size
    context = 1 + sum(s.num_tokens(patch) if isinstance(s, VisualSegment) else len(s) for s in visual_segments)
    state = {"rows": torch.arange(batch, device=dev), "history": torch.zeros(batch, 0, dtype=torch.long, device=dev)}

    def step(t: int, prev: Tensor | None) -> Tensor:
        hist = state["history"]
        if prev is not None:
            hist = torch.cat([hist, prev.to(dev).unsqueeze(1)], 1)
            state["history"] = hist
        rows = state["rows"].shape[0]
        words = torch.cat([hist, torch.zeros(rows, 1, dtype=torch.long, device=dev)], 1)  # [rows, t + 1]
        queries = torch.full_like(words, SPE_ID)
        pos = torch.arange(t + 1, device=dev)
        text = TextSegment(torch.cat([words, queries], 1), None, torch.cat([pos, pos]))
        segs = _select(visual_segments, state["rows"]) + [text]
        mask = caption_mask(context, t + 1, device=dev)
        h, _ = model.hidden(segs, attn_mask=mask, temporal_offset=0)
        return model.read_out(h[:, -1:])

    def reorder(index: Tensor) -> None:
        index = index.to(dev)
        state["rows"] = state["rows"].index_select(0, index)
        state["history"] = state["history"].index_select(0, index)

    return _search(batch, step, reorder, model, vocab_feats.to(dev), vocab_ids, beam_size=beam_size,
                   max_len=max_len, length_penalty=length_penalty, eos_id=eos_id, scale=scale)
