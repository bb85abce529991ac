"""The shared target sets of one training micro-step, encoded WITH gradients (reference).

Single process: the drawn task's target set (class names, answers, vocabulary) goes through the
encoder every step, so the target side learns too. Only token ids are cached between steps,
never features: features would be stale after the first update.

Data parallel: every rank drew its own task, but the vocabulary can be far larger than any
batch. All ranks learn which tasks were drawn (one small all-gather of task indices), put the
text target sets of those tasks side by side in a fixed order, and each encodes one contiguous
shard with gradients; a differentiable all-gather gives everyone every feature. A rank whose own
task needs none of them still joins (with a zero-weighted term so its backward pass reaches the
collective as well).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from uniperceiver.engine.distributed import DistEnv, gather_ints, shard_encode
from uniperceiver.tasks.base import TargetSet, Task, encode_targets


def target_rng(seed: int, step: int, micro: int, task: int) -> np.random.Generator:
    """RNG of `sample_target_set` (e.g. one ImageNet-21k synonym per class): equal on every rank."""
    return np.random.default_rng([int(seed), 0x7A26E7, int(step), int(micro), int(task)])


class TargetSets:
    """Per-task cache of target token ids, and the per-step encoding (sharded when distributed)."""

    def __init__(self, tasks: Sequence[Task], seed: int) -> None:
        self.tasks = list(tasks)
        self.seed = int(seed)
        self._cache: dict[int, TargetSet | None] = {}

    def token_ids(self, index: int, step: int, micro: int) -> TargetSet | None:
        """The task's target set as token ids (cached unless the family samples one per batch)."""
        task = self.tasks[index]
        sampler = getattr(task, "sample_target_set", None)
        if callable(sampler):
            return sampler(target_rng(self.seed, step, micro, index))
        if index not in self._cache:
            self._cache[index] = task.target_set()
        return self._cache[index]

    def _custom(self, index: int) -> Any:
        """The family's own encoder for targets that are not plain texts (e.g. example images).

        Classification always offers `encode_target_set`; for class NAMES it is `encode_targets`,
        so those stay on the shared (shardable) text path.
        """
        task = self.tasks[index]
        enc = getattr(task, "encode_target_set", None)
        if not callable(enc) or getattr(task, "targets_kind", "images") == "names":
            return None
        return enc

    def plan(self, index: int, step: int, micro: int, env: DistEnv) -> "StepTargets":
        """Decide what to encode this micro-step (a collective when distributed: call on all ranks)."""
        own = self.token_ids(index, step, micro)
        if not env.distributed:
            return StepTargets(index, own, self._custom(index), [], None)
        drawn = sorted({t for (t,) in gather_ints([index], env)})
        shared: list[tuple[int, TargetSet]] = []
        for t in drawn:
            if self._custom(t) is not None:
                continue
            ts = own if t == index else self.token_ids(t, step, micro)
            if ts is not None and len(ts) > 0:
                shared.append((t, ts))
        return StepTargets(index, own, self._custom(index), shared, env)


class StepTargets:
    """What one micro-step encodes; `encode(model)` runs inside the DDP forward.

    A plain class on purpose: DDP rebuilds dataclass inputs field by field when it moves inputs
    to a GPU, which this object (holding a process group) must not go through.
    """

    def __init__(self, index: int, own: TargetSet | None, custom: Any, shared: list[tuple[int, TargetSet]],
                 env: DistEnv | None) -> None:
        self.index = index
        self.own = own
        self.custom = custom
        self.shared = shared
        self.env = env

    def encode(self, model: nn.Module) -> tuple[Tensor | None, Tensor | None]:
        """(features of this rank's task targets or None, a zero term tying in the collective)."""
        if self.env is None:
            if self.own is None:
                return None, None
            if self.custom is not None:
                return self.custom(model, self.own), None
            return encode_targets(model, self.own), None  # type: ignore[arg-type]
        feats = None
        tie = None
        if self.shared:
            width = max(ts.ids.shape[1] for _, ts in self.shared)
            ids = torch.cat([_pad(ts.ids, width, 0) for _, ts in self.shared], 0)
            valid = torch.cat([_pad(ts.valid, width, False) for _, ts in self.shared], 0)
            every = shard_encode(model, ids, valid, self.env)
            tie = every.sum() * 0.0
            start = 0
            for t, ts in self.shared:
                if t == self.index:
                    feats = every[start : start + len(ts)]
                start += len(ts)
        if feats is None and self.own is not None and self.custom is not None:
            feats = self.custom(model, self.own)
        return feats, tie


def _pad(x: Tensor, width: int, value: Any) -> Tensor:
    if x.shape[1] == width:
        return x
    out = torch.full((x.shape[0], width), value, dtype=x.dtype)
    out[:, : x.shape[1]] = x
    return out


__all__ = ["StepTargets", "TargetSets", "target_rng"]
