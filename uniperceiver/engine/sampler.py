"""Which task, and which samples, each rank trains on at each draw: stateless choice, resumable cursors.

Task choice (reference: every GPU draws its own task each iteration, weighted by sample_weight) is a
pure function of (seed, rank, draw): nothing to save, and a resumed run draws exactly what the
uninterrupted one would have drawn.

Samples: per task, a seeded permutation per epoch (the same on every rank), sharded by rank
(`perm[rank::world]`), read through a cursor. The whole state is (epoch, cursor): saved in
checkpoints, restored on resume. A batch that crosses the end of an epoch continues in the next
one, so tiny few-shot subsets (fewer samples than a batch) still give full batches.
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

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's indices of `epoch`, in order (a permutation shared by all ranks, strided)."""
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

    def next_batch(self) -> tuple[list[tuple[int, int]], BatchSamplerState]:
        """The next batch as (epoch, index) pairs, and the state after it (the cursor advances)."""
        out: list[tuple[int, int]] = []
        epoch, cursor = self.state.epoch, self.state.cursor
        while len(out) < self.batch_size:
            shard = self.shard(epoch)
            if cursor >= shard.size:
                epoch, cursor = epoch + 1, 0
                continue
            out.append((epoch, int(shard[cursor])))
            cursor += 1
        self.state = BatchSamplerState(epoch, cursor)
        return out, BatchSamplerState(epoch, cursor)

    def batches_per_epoch(self) -> int:
        return max(1, -(-self.shard(self.state.epoch).size // self.batch_size))

    def state_dict(self) -> dict[str, int]:
        return self.state.to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = BatchSamplerState(int(state["epoch"]), int(state["cursor"]))


__all__ = ["BatchSamplerState", "ResumableBatchSampler", "TaskChooser", "stable_hash"]
