"""Which task, and which samples, each rank trains on at each draw: stateless choice, resumable cursors.

Task choice (reference: every GPU draws its own task each iteration, weighted by sample_weight) is a
pure function of (seed, rank, draw): nothing to save, and a resumed run draws exactly what the
uninterrupted one would have drawn.

Samples: per task, a seeded permutation per epoch (the same on every rank), sharded by rank
(`perm[rank::world]`), read through a cursor. The whole state is (epoch, cursor): saved in
checkpoints, restored on resume. A batch that crosses the end of an epoch continues in the next
one, so tiny few-shot subsets (fewer samples than a batch) still give full batches.

Up to `ARRAY_LIMIT` samples the permutation is an array; beyond (a streamed text corpus has one
sample per line: ~10^8), an array per epoch would cost gigabytes, so position k maps to a sample
through a keyed bijection computed per index (`KeyedPermutation`): memory flat in the corpus size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
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


@dataclass
class BatchSamplerState:
    epoch: int = 0
    cursor: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}


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
        self.state = BatchSamplerState() if state is None else BatchSamplerState(state.epoch, state.cursor)
        self._shard_epoch = -1
        self._shard: np.ndarray = np.empty(0, dtype=np.int64)
        self._perm: KeyedPermutation | None = None

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's indices of `epoch`, in order (a permutation shared by all ranks, strided).

        Only for up to ARRAY_LIMIT samples; larger tasks are read per position (`_sample_at`)."""
        if epoch != self._shard_epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, stable_hash(self.key), int(epoch)])
                perm = rng.permutation(self.num_samples)
            else:
                perm = np.arange(self.num_samples)
            shard = perm[self.rank :: self.world_size]
            if shard.size == 0:  # fewer samples than ranks: every rank still gets one
                shard = perm[[self.rank % self.num_samples]]
            self._shard, self._shard_epoch = shard, epoch
        return self._shard

    def shard_size(self) -> int:
        """How many samples this rank reads per epoch (the same every epoch: no permutation needed)."""
        return max(1, len(range(self.rank, self.num_samples, self.world_size)))

    def _sample_at(self, epoch: int, position: int) -> int:
        """The sample at `position` of this rank's shard of `epoch`."""
        if self.num_samples <= ARRAY_LIMIT:
            return int(self.shard(epoch)[position])
        if epoch != self._shard_epoch:
            key = stable_hash(f"{self.seed}/{self.key}/{epoch}")
            self._perm = KeyedPermutation(self.num_samples, key) if self.shuffle else None
            self._shard_epoch = epoch
        k = self.rank + position * self.world_size
        return k if self._perm is None else self._perm[k]

    def next_batch(self) -> tuple[list[tuple[int, int]], BatchSamplerState]:
        """The next batch as (epoch, index) pairs, and the state after it (the cursor advances)."""
        out: list[tuple[int, int]] = []
        epoch, cursor = self.state.epoch, self.state.cursor
        size = self.shard_size()
        while len(out) < self.batch_size:
            if cursor >= size:
                epoch, cursor = epoch + 1, 0
                continue
            out.append((epoch, self._sample_at(epoch, cursor)))
            cursor += 1
        self.state = BatchSamplerState(epoch, cursor)
        return out, BatchSamplerState(epoch, cursor)

    def batches_per_epoch(self) -> int:
        return max(1, -(-self.shard_size() // self.batch_size))

    def state_dict(self) -> dict[str, int]:
        return self.state.to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = BatchSamplerState(int(state["epoch"]), int(state["cursor"]))


__all__ = ["ARRAY_LIMIT", "BatchSamplerState", "KeyedPermutation", "ResumableBatchSampler", "TaskChooser", "stable_hash"]
