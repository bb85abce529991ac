"""Which task, and which samples, each rank trains on at each draw: stateless choice, resumable cursors.

Task choice (reference: every GPU draws its own task each iteration, weighted by sample_weight) is a
pure function of (seed, rank, draw): nothing to save, and a resumed run draws exactly what the
uninterrupted one would have drawn.

Samples: per task, a seeded permutation per epoch (the same on every rank), sharded by rank
(`perm[rank::world]`), read through a cursor. The whole state is (epoch, cursor): saved in
checkpoints, restored on resume. A batch that crosses the end of an epoch continues in the next
one, so tiny few-shot subsets (fewer samples than a batch) still give full batches.

Another world size on resume: rank r of W reads perm[r::W], so cursors of W ranks mean nothing to
W' ranks. `rederive_states` turns what the old ranks had left of the epochs in progress into
`pending` runs of positions dealt round-robin to the new ranks, read before their regular shards
(which start at the next epoch): every sample is read exactly once. The state stays small: one
run (epoch, start, stop, stride) per old rank and epoch, however large the dataset.

Up to `ARRAY_LIMIT` samples the permutation is an array; beyond (a streamed text corpus has one
sample per line: ~10^8), an array per epoch would cost gigabytes, so position k maps to a sample
through a keyed bijection computed per index (`KeyedPermutation`): memory flat in the corpus size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from uniperceiver.errors import ConfigError


def stable_hash(text: str) -> int:
    """A 63-bit hash of a string that is the same in every process (unlike Python's `hash`)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") >> 1


ARRAY_LIMIT = 1 << 22  # 4M samples: a 32 MB permutation per epoch


def _mix(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


class KeyedPermutation:
    """A seeded bijection of [0, n) evaluated one index at a time in O(1) memory.

    A 4-round Feistel network on the smallest even number of bits covering n is a bijection of
    [0, 2^bits); cycle-walking (re-applying it until the value falls below n) restricts it to a
    bijection of [0, n). 2^bits < 4n, so a walk takes under 4 applications on average.
    """

    def __init__(self, n: int, key: int) -> None:
        if n <= 0:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = int(n)
        half = max(1, ((self.n - 1).bit_length() + 1) // 2)
        self.half_bits, self.mask = half, (1 << half) - 1
        self.keys = [_mix(int(key) * 4 + r) for r in range(4)]

    def _feistel(self, x: int) -> int:
        left, right = x >> self.half_bits, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << self.half_bits) | right

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"position {i} outside [0, {self.n})")
        x = self._feistel(int(i))
        while x >= self.n:
            x = self._feistel(x)
        return x


class TaskChooser:
    """Weighted random choice of a task index per (rank, draw), independent of any history."""

    def __init__(self, weights: Sequence[float], seed: int) -> None:
        w = np.asarray([float(x) for x in weights], dtype=np.float64)
        if w.size == 0:
            raise ConfigError("a recipe needs at least one task under `tasks:`")
        if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
            raise ConfigError(f"tasks' sample_weight values must be >= 0 with a positive sum, got {w.tolist()}")
        self.p = w / w.sum()
        self.seed = int(seed)

    def __len__(self) -> int:
        return int(self.p.size)

    def choose(self, rank: int, draw: int) -> int:
        if self.p.size == 1:
            return 0
        rng = np.random.default_rng([self.seed, 0x7A5C, int(rank), int(draw)])
        return int(rng.choice(self.p.size, p=self.p))


#: A run of global positions of one epoch's permutation: (epoch, start, stop, stride) stands for
#: positions start, start + stride, ... below stop. What a resume on another world size hands a rank.
Segment = tuple[int, int, int, int]


def segment_length(seg: Segment) -> int:
    _, start, stop, stride = seg
    return max(0, -(-(stop - start) // stride))


@dataclass
class BatchSamplerState:
    """Where a rank is: `pending` positions first (left over from a run on another world size),
    then its regular shard `perm[rank::world]` of `epoch` from `cursor` (counted in samples)."""

    epoch: int = 0
    cursor: int = 0
    pending: tuple[Segment, ...] = ()

    def __post_init__(self) -> None:
        self.pending = tuple((int(e), int(a), int(b), int(c)) for e, a, b, c in self.pending)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"epoch": self.epoch, "cursor": self.cursor}
        if self.pending:  # absent in the common case, so a checkpoint's cursors read as before
            out["pending"] = [list(seg) for seg in self.pending]
        return out


class ResumableBatchSampler:
    """Batches of dataset indices for one task on one rank; state (epoch, cursor) is all it needs."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int,
        key: str = "",
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        state: BatchSamplerState | None = None,
    ) -> None:
        if num_samples <= 0:
            raise ConfigError(f"task {key!r} has no training samples")
        if batch_size <= 0:
            raise ConfigError(f"task {key!r}: batch_size={batch_size} must be positive")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world size {world_size}")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.key = key
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = shuffle
        self.state = BatchSamplerState() if state is None else replace(state)
        self._shard_epoch = -1
        self._shard: np.ndarray = np.empty(0, dtype=np.int64)
        self._perm: KeyedPermutation | None = None

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's indices of `epoch`, in order (a permutation shared by all ranks, strided).

        Only for up to ARRAY_LIMIT samples; larger tasks are read per position (`_sample_at`)."""
        perm = self._epoch_perm(epoch)
        shard = perm[self.rank :: self.world_size]
        return shard if shard.size else perm[[self.rank % self.num_samples]]  # fewer samples than ranks

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        if epoch != self._shard_epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, stable_hash(self.key), int(epoch)])
                self._shard = rng.permutation(self.num_samples)
            else:
                self._shard = np.arange(self.num_samples)
            self._shard_epoch = epoch
        return self._shard

    def shard_size(self) -> int:
        """How many samples this rank reads per epoch (the same every epoch: no permutation needed)."""
        return max(1, len(range(self.rank, self.num_samples, self.world_size)))

    def _global_at(self, epoch: int, k: int) -> int:
        """The sample at global position `k` of `epoch`'s permutation (shared by every rank)."""
        if self.num_samples <= ARRAY_LIMIT:
            return int(self._epoch_perm(epoch)[k])
        if epoch != self._shard_epoch:
            key = stable_hash(f"{self.seed}/{self.key}/{epoch}")
            self._perm = KeyedPermutation(self.num_samples, key) if self.shuffle else None
            self._shard_epoch = epoch
        return k if self._perm is None else self._perm[k]

    def _sample_at(self, epoch: int, position: int) -> int:
        """The sample at `position` of this rank's shard of `epoch`."""
        k = self.rank + position * self.world_size
        if k >= self.num_samples:  # fewer samples than ranks: every rank still gets one
            k = self.rank % self.num_samples
        return self._global_at(epoch, k)

    def next_batch(self) -> tuple[list[tuple[int, int]], BatchSamplerState]:
        """The next batch as (epoch, index) pairs, and the state after it (the cursor advances)."""
        out: list[tuple[int, int]] = []
        pending = list(self.state.pending)
        while pending and len(out) < self.batch_size:
            epoch, start, stop, stride = pending[0]
            out.append((epoch, self._global_at(epoch, start)))
            if start + stride < stop:
                pending[0] = (epoch, start + stride, stop, stride)
            else:
                pending.pop(0)
        epoch, cursor = self.state.epoch, self.state.cursor
        size = self.shard_size()
        while len(out) < self.batch_size:
            if cursor >= size:
                epoch, cursor = epoch + 1, 0
                continue
            out.append((epoch, self._sample_at(epoch, cursor)))
            cursor += 1
        self.state = BatchSamplerState(epoch, cursor, tuple(pending))
        return out, self.state

    def batches_per_epoch(self) -> int:
        return max(1, -(-self.shard_size() // self.batch_size))

    def state_dict(self) -> dict[str, Any]:
        return self.state.to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = BatchSamplerState(int(state["epoch"]), int(state["cursor"]), tuple(state.get("pending", ())))


def rederive_states(saved: Sequence[BatchSamplerState], num_samples: int, world_size: int) -> list[BatchSamplerState]:
    """The states of `world_size` ranks that read exactly what the ranks of `saved` had left.

    Why: rank r of W reads perm[r::W], so a rank's (epoch, cursor) means nothing on another world
    size. Everything the old ranks had not read yet, up to the furthest epoch any of them reached,
    becomes `pending` segments dealt round-robin to the new ranks (each takes every world_size-th
    position of their concatenation, in epoch order); all new ranks then start the next epoch at
    cursor 0. So every sample of those epochs is read exactly once overall: none repeated, none
    skipped. The caller checks num_samples >= both world sizes (below that, ranks share samples).
    """
    old = len(saved)
    last = max(s.epoch for s in saved)
    left: list[Segment] = []
    for rank, s in enumerate(saved):
        left.extend(s.pending)
        left.append((s.epoch, rank + s.cursor * old, num_samples, old))
        left.extend((e, rank, num_samples, old) for e in range(s.epoch + 1, last + 1))
    left = sorted((seg for seg in left if segment_length(seg) > 0), key=lambda seg: seg[0])  # stable: epoch order
    dealt: list[list[Segment]] = [[] for _ in range(world_size)]
    at = 0  # index of the segment's first position in the concatenation
    for seg in left:
        epoch, start, stop, stride = seg
        length = segment_length(seg)
        for rank in range(world_size):
            first = (rank - at) % world_size
            if first < length:
                dealt[rank].append((epoch, start + first * stride, stop, stride * world_size))
        at += length
    return [BatchSamplerState(last + 1, 0, tuple(segs)) for segs in dealt]


__all__ = [
    "ARRAY_LIMIT", "BatchSamplerState", "KeyedPermutation", "ResumableBatchSampler", "Segment", "TaskChooser",
    "rederive_states", "segment_length", "stable_hash",
]
