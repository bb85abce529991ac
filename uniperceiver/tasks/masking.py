"""Whole-word masking (the reference's `random_word_wwm`), as a word-by-word loop and as its numpy twin.

`whole_word_mask` takes words as lists of BPE ids (the text path). `whole_word_mask_array` takes one
window of a pre-tokenised corpus (ids plus a word-end flag per id) and gives the very same result for the
same generator: it replays the loop's draws from one array of the generator's 64-bit outputs instead of
asking numpy for one uniform per word, which is what makes the pre-tokenised path an order of magnitude
faster. The replay follows how numpy's `Generator` consumes PCG64 output (`default_rng`'s bit generator;
read from numpy's source and pinned by the parity tests); any other bit generator takes the loop.
"""

from __future__ import annotations

import numpy as np

from uniperceiver.tokenizers.text import SPE_ID, VOCAB_SIZE

MASK_ID = SPE_ID  # the reference masks with <|spe|>, not <|mask|>


def whole_word_mask(
    words: list[list[int]], rng: np.random.Generator, mask_prob: float = 0.15, vocab_size: int = VOCAB_SIZE
) -> tuple[list[int], list[int], list[int]]:
    """Mask whole words (reference `random_word_wwm`) -> (input ids, labels (-1 = none), word index per id)."""
    ids: list[int] = []
    labels: list[int] = []
    word_index: list[int] = []
    for w, pieces in enumerate(words):
        p = float(rng.random())
        if p < mask_prob:
            p /= mask_prob
            if p < 0.8:
                ids.extend([MASK_ID] * len(pieces))
            elif p < 0.9:
                ids.extend(int(v) for v in rng.integers(0, vocab_size, size=len(pieces)))
            else:
                ids.extend(pieces)
            labels.extend(pieces)
        else:
            ids.extend(pieces)
            labels.extend([-1] * len(pieces))
        word_index.extend([w] * len(pieces))
    return ids, labels, word_index


def truncate_keep_last(seq: list[int], max_len: int) -> list[int]:
    """The reference truncation: the first max_len - 1 items and the last one."""
    return seq if len(seq) <= max_len else seq[: max_len - 1] + [seq[-1]]


_UNIT, _SHIFT = 1.0 / 9007199254740992.0, np.uint64(11)  # Generator.random() is (a 64-bit draw >> 11) * 2**-53


def _random_id_candidates(units: np.ndarray, mask_prob: float) -> list[int]:
    """Positions whose uniform may send a word to random ids (a loose test; `_first_hit` decides)."""
    near = (units >= 0.8 * mask_prob * (1 - 1e-9)) & (units < 0.9 * mask_prob * (1 + 1e-9))
    return near.nonzero()[0].tolist()


def _first_hit(candidates: list[int], start: int, stop: int, units: np.ndarray, mask_prob: float) -> int:
    """The first candidate in [start, stop) that passes `whole_word_mask`'s own float test for "chosen,
    then random ids", or -1."""
    for c in candidates:
        if start <= c < stop:
            p = float(units[c])
            if p < mask_prob and not p / mask_prob < 0.8 and p / mask_prob < 0.9:
                return c
    return -1


class _Pcg64Draws:
    """The 64-bit draws of a PCG64 generator, handed out the way numpy's `Generator` consumes them:
    `random()` takes one draw per value ((x >> 11) * 2**-53); `integers(0, k)` with k < 2**32 takes one
    32-bit half per value (the low half of a fresh draw, the high half kept for the next call, as PCG64's
    `next_uint32` does) through Lemire's multiply-and-reject. The parity tests pin this to numpy's own
    results; `whole_word_mask_array` uses it only when the generator's bit generator is PCG64."""

    def __init__(self, bits: np.random.PCG64, count: int) -> None:
        self.bits = bits
        self.entry = bits.state
        self.raw = bits.random_raw(count)
        self.units = (self.raw >> _SHIFT) * _UNIT
        self.pos = 0  # draws consumed so far
        self.has_half = bool(self.entry["has_uint32"])
        self.half = int(self.entry["uinteger"])

    def ensure(self, count: int) -> bool:
        """Have at least `count` draws in hand (rare: long random-id words eat some); True when more came."""
        if count <= self.raw.size:
            return False
        extra = self.bits.random_raw(count - self.raw.size + 64)
        self.raw = np.concatenate((self.raw, extra))
        self.units = np.concatenate((self.units, (extra >> _SHIFT) * _UNIT))
        return True

    def _next64(self) -> int:
        self.ensure(self.pos + 1)
        self.pos += 1
        return int(self.raw[self.pos - 1])

    def integers(self, high: int, count: int) -> np.ndarray:
        """`Generator.integers(0, high, size=count)` (int64)."""
        threshold = (2**32 - high) % high
        out = np.empty(count, dtype=np.int64)
        for k in range(count):
            while True:
                if self.has_half:
                    x, self.has_half = self.half, False
                else:
                    v = self._next64()
                    x, self.half, self.has_half = v & 0xFFFFFFFF, v >> 32, True
                m = x * high
                if (m & 0xFFFFFFFF) >= threshold:
                    break
            out[k] = m >> 32
        return out

    def finish(self) -> None:
        """Leave the generator exactly where the word-by-word loop leaves it: the unused draws are given
        back (`advance` by a negative count, which also empties the 32-bit buffer), then the buffer is set."""
        self.bits.advance(self.pos - self.raw.size)
        if self.has_half or self.half:
            state = self.bits.state
            state["has_uint32"], state["uinteger"] = int(self.has_half), self.half
            self.bits.state = state


def _word_draws(rng: np.random.Generator, word_ends: np.ndarray, mask_prob: float,
                vocab_size: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """The draws `whole_word_mask` makes, in its order: one `random()` per word and, right after the draw
    of a word that gets random ids, one `integers()` call for its pieces -> (uniforms, [(word, ids)]).

    The 64-bit draws are taken as one array and handed out in that order (`_Pcg64Draws`), so the stream,
    every word's fate and the generator's final state are those of the word-by-word loop.
    """
    n = word_ends.size
    draws = _Pcg64Draws(rng.bit_generator, n + 16)
    candidates = _random_id_candidates(draws.units, mask_prob)
    p = np.empty(n)
    random_ids: list[tuple[int, np.ndarray]] = []
    w = 0
    while w < n:
        start, stop = draws.pos, draws.pos + n - w  # the uniforms of words w .. n - 1, if none gets random ids
        if draws.ensure(stop):
            candidates = _random_id_candidates(draws.units, mask_prob)
        hit = _first_hit(candidates, start, stop, draws.units, mask_prob)
        if hit < 0:
            p[w:] = draws.units[start:stop]
            draws.pos = stop
            break
        word = w + hit - start
        p[w:word + 1] = draws.units[start:hit + 1]
        draws.pos = hit + 1
        pieces = int(word_ends[word]) - (int(word_ends[word - 1]) if word else -1)
        random_ids.append((word, draws.integers(vocab_size, pieces)))
        w = word + 1
    draws.finish()
    return p, random_ids


def whole_word_mask_array(
    tokens: np.ndarray, word_end: np.ndarray, rng: np.random.Generator, mask_prob: float = 0.15,
    vocab_size: int = VOCAB_SIZE,
) -> np.ndarray:
    """`whole_word_mask` on ids with word ends (a pre-tokenised window), in numpy: the same rng draws,
    hence the same result, as one int64 array [3, T]: input ids, labels (-1 = none), word index per id."""
    ends = np.asarray(word_end, dtype=bool)
    if ends.size and not ends[-1]:
        raise ValueError("the last id of a window must end a word")
    if type(rng.bit_generator) is not np.random.PCG64 or vocab_size >= 2**32:  # replayed for PCG64 only
        cuts = np.flatnonzero(ends)[:-1] + 1
        words = [w.tolist() for w in np.split(np.asarray(tokens, dtype=np.int64), cuts)] if ends.size else []
        return np.array(whole_word_mask(words, rng, mask_prob, vocab_size), dtype=np.int64).reshape(3, -1)
    out = np.empty((3, ends.size), dtype=np.int64)
    word_index = out[2]
    ends.cumsum(out=word_index)
    word_index -= ends  # words ended before each id
    end_at = ends.nonzero()[0]
    p, random_ids = _word_draws(rng, end_at, mask_prob, vocab_size)
    chosen = p < mask_prob
    ids, labels = out[0], out[1]
    ids[:] = tokens
    labels.fill(-1)
    np.copyto(labels, ids, where=chosen[word_index])
    np.copyto(ids, MASK_ID, where=(chosen & (p / mask_prob < 0.8))[word_index])
    for word, values in random_ids:
        ids[int(end_at[word]) - values.size + 1:int(end_at[word]) + 1] = values
    return out


def truncate_keep_last_array(seq: np.ndarray, max_len: int) -> np.ndarray:
    """`truncate_keep_last` along the last axis of an array."""
    return seq if seq.shape[-1] <= max_len else np.concatenate((seq[..., : max_len - 1], seq[..., -1:]), axis=-1)


__all__ = ["MASK_ID", "whole_word_mask", "whole_word_mask_array", "truncate_keep_last", "truncate_keep_last_array"]
