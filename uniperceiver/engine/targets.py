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

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from uniperceiver.engine.distributed import DistEnv, gather_ints, shard_encode
from uniperceiver.tasks.base import TargetSet, Task


def target_rng(seed: int, step: int, micro: int, task: int) -> np.random.Generator:
    """RNG of `Task.training_target_set` (e.g. one ImageNet-21k synonym per class): equal on every rank."""
    return np.random.default_rng([int(seed), 0x7A26E7, int(step), int(micro), int(task)])


class TargetSets:
    """Per-task cache of target token ids, and the per-step encoding (sharded when distributed)."""

    def __init__(self, tasks: Sequence[Task], seed: int) -> None:
        self.tasks = list(tasks)
        self.seed = int(seed)
        self._cache: dict[int, TargetSet | None] = {}

    def token_ids(self, index: int, step: int, micro: int) -> TargetSet | None:
        """The task's target set as token ids (cached unless `target_set_varies`)."""
        task = self.tasks[index]
        if task.target_set_varies:
            return task.training_target_set(target_rng(self.seed, step, micro, index))
        if index not in self._cache:
            self._cache[index] = task.target_set()
        return self._cache[index]

    def plan(self, index: int, step: int, micro: int, env: DistEnv) -> "StepTargets":
        """Decide what to encode this micro-step (a collective when distributed: call on all ranks)."""
        task = self.tasks[index]
        own = self.token_ids(index, step, micro)
        if not env.distributed:
            return StepTargets(index, own, task.encode_target_set, [], None)
        drawn = sorted({t for (t,) in gather_ints([index], env)})
        shared: list[tuple[int, TargetSet]] = []
        for t in drawn:
            if not self.tasks[t].targets_are_texts:
                continue  # example images: only the task's own encoder knows them
            ts = own if t == index else self.token_ids(t, step, micro)
            if ts is not None and len(ts) > 0:
                shared.append((t, ts))
        return StepTargets(index, own, task.encode_target_set, shared, env)


class StepTargets:
    """What one micro-step encodes; `encode(model)` runs inside the DDP forward.

    A plain class on purpose: DDP rebuilds dataclass inputs field by field when it moves inputs
    to a GPU, which this object (holding a process group) must not go through.
    """

    def __init__(self, index: int, own: TargetSet | None, encode_own: Callable[[Any, TargetSet], Tensor],
                 shared: list[tuple[int, TargetSet]], env: DistEnv | None) -> None:
        self.index = index
        self.own = own
        #: The drawn task's `encode_target_set` (texts single-process, example images always).
        self.encode_own = encode_own
        self.shared = shared
        self.env = env

    def encode(self, model: nn.Module) -> tuple[Tensor | None, Tensor | None]:
        """(features of this rank's task targets or None, a zero term tying in the collective)."""
        if self.env is None:
            if self.own is None:
                return None, None
            return self.encode_own(model, self.own), None
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
        if feats is None and self.own is not None and len(self.own) > 0:
            # Example-image targets (never in the shared text set) go through the task itself.
            feats = self.encode_own(model, self.own)
        return feats, tie


def _pad(x: Tensor, width: int, value: Any) -> Tensor:
    if x.shape[1] == width:
        return x
    out = torch.full((x.shape[0], width), value, dtype=x.dtype)
    out[:, : x.shape[1]] = x
    return out


__all__ = ["StepTargets", "TargetSets", "target_rng"]
