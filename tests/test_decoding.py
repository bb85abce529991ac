"""Caption beam search: the KV-cached decoder equals full recomputation, and the search rules hold.

Images are scikit-learn's handwritten digits (real pixels); the vocabulary is a real subset of the
CLIP ids (the words of the mini captions plus a seeded sample), encoded by the model itself.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from uniperceiver.errors import ConfigError
from uniperceiver.modeling.decoding import _search, beam_search, decode_uncached
from uniperceiver.modeling.masks import caption_mask
from uniperceiver.modeling.model import TextSegment, VisualSegment
from uniperceiver.tasks.base import encode_targets, vocab_target_set
from uniperceiver.tokenizers.text import EOT_ID, SPE_ID, get_tokenizer

import sys as _sys
from pathlib import Path as _Path
_sys.path.insert(0, str(_Path(__file__).parent))
from _tiny_models import digits as _digits, sensitive_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return sensitive_tiny_model()


@pytest.fixture(scope="module")
def vocab(model):
    tok = get_tokenizer()
    words = set(tok.encode("a handwritten digit zero one two three four five six seven eight nine on a white page"))
    rng = np.random.default_rng(0)
    words.update(int(i) for i in rng.choice(49406, size=150, replace=False))
    ts = vocab_target_set(sorted(words | {EOT_ID}))
    with torch.no_grad():
        feats = encode_targets(model, ts)
    return feats, ts.ids[:, 0].clone()


@pytest.mark.parametrize("beam,lp", [(1, 0.0), (2, 0.0), (3, 2.0)])
def test_cached_beam_search_equals_full_recomputation(model, vocab, beam, lp) -> None:
    feats, ids = vocab
    segs = [VisualSegment(_digits(4))]
    cached = beam_search(model, segs, feats, ids, beam_size=beam, max_len=7, length_penalty=lp)
    full = decode_uncached(model, segs, feats, ids, beam_size=beam, max_len=7, length_penalty=lp)
    assert cached == full
    assert len(cached) == 4 and all(0 < len(c) <= 7 or len(c) == 0 for c in cached)
    allowed = set(ids.tolist())
    assert all(t in allowed and t != EOT_ID for c in cached for t in c)
    assert len({tuple(c) for c in cached}) > 1  # different images, different captions


def test_greedy_equals_an_independent_teacher_forced_loop(model, vocab) -> None:
    feats, ids = vocab
    imgs = _digits(3)
    got = beam_search(model, [VisualSegment(imgs)], feats, ids, beam_size=1, max_len=6)
    scale = model.logit_scale("caption")
    for b in range(3):
        words: list[int] = []
        for t in range(6):
            w = torch.tensor([words + [0]])
            q = torch.full_like(w, SPE_ID)
            pos = torch.arange(t + 1)
            with torch.no_grad():
                h, _ = model.hidden([VisualSegment(imgs[b : b + 1]), TextSegment(torch.cat([w, q], 1), None, torch.cat([pos, pos]))],
                                    attn_mask=caption_mask(17, t + 1))
                logits = model.head(h[:, -1]) @ feats.t() * scale
            nxt = int(ids[int(logits.argmax())])
            if nxt == EOT_ID:
                break
            words.append(nxt)
        assert got[b] == words


class _Table:
    """A next-word distribution that depends on the history: exercises the search rules exactly.

    Rows of the vocabulary: 0 = EOT, 1 = A, 2 = B. Greedy takes A then A (0.5 x 0.41 x 0.98 = 0.2009);
    beam 2 finds B EOT (0.4 x 0.9 = 0.36); a length penalty of 2 prefers the longer A A.
    """

    def __init__(self, batch: int) -> None:
        self.hist = [[] for _ in range(batch)]

    @staticmethod
    def probs(h: list[int]) -> list[float]:
        if not h:
            return [0.1, 0.5, 0.4]
        if h == [1]:
            return [0.2, 0.41, 0.39]
        if h == [2]:
            return [0.9, 0.05, 0.05]
        return [0.98, 0.01, 0.01]

    def step(self, t: int, prev):
        if prev is not None:
            for row, w in zip(self.hist, prev.tolist()):
                row.append({EOT_ID: 0, 320: 1, 321: 2}[w])
        return torch.log(torch.tensor([self.probs(h) for h in self.hist]))

    def reorder(self, index) -> None:
        self.hist = [list(self.hist[i]) for i in index.tolist()]


def _run(model, beam: int, lp: float = 0.0, max_len: int = 5, batch: int = 2):
    table = _Table(batch)
    return _search(batch, table.step, table.reorder, model, torch.eye(3), torch.tensor([EOT_ID, 320, 321]),
                   beam_size=beam, max_len=max_len, length_penalty=lp, eos_id=EOT_ID, scale=None)


def test_search_rules_on_a_known_distribution(model) -> None:
    assert _run(model, beam=1) == [[320, 320]] * 2  # greedy
    assert _run(model, beam=2) == [[321]] * 2  # beam search finds the better caption, stops before EOT
    # Reference length penalty: log p / (non-EOT tokens + 1) ** lp.
    assert math.log(0.36) / 2**2 < math.log(0.5 * 0.41 * 0.98) / 3**2
    assert _run(model, beam=2, lp=2.0) == [[320, 320]] * 2
    assert _run(model, beam=1, max_len=1) == [[320]] * 2  # cut at max_len without an EOT


def test_bad_decoding_arguments(model, vocab) -> None:
    feats, ids = vocab
    segs = [VisualSegment(_digits(1))]
    keep = ids != EOT_ID
    with pytest.raises(ConfigError, match="end token"):
        beam_search(model, segs, feats[keep], ids[keep])
    with pytest.raises(ConfigError, match="beam_size"):
        beam_search(model, segs, feats[:3], ids[:3], beam_size=4, eos_id=int(ids[0]))
    with pytest.raises(ConfigError, match="vocab_ids"):
        beam_search(model, segs, feats, ids[:-1])
