"""Multi-task data loading: a deterministic plan of draws, loaded in order, exactly resumable.

Because the task choice is a pure function of (seed, rank, draw) and each task's batch sampler is
a pure function of its (epoch, cursor), the whole sequence of batches a rank will see is known in
advance. `MultiTaskLoader` walks that plan; workers (when num_workers > 0) load draws ahead in
order, and the main process records a draw as done only when the trainer takes it. The saved
state therefore describes exactly what was trained on, however far workers had prefetched.

Unreadable media never stop training: `task.load` raising `MediaError` is caught, counted by kind
(`missing_media`, `unreadable_media`, ...) and the sample dropped from its batch. A draw whose
samples all failed is returned empty and the trainer takes the next one; a task that loads
nothing for a whole epoch is a DataError naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from uniperceiver.engine.sampler import BatchSamplerState, ResumableBatchSampler, TaskChooser
from uniperceiver.errors import DataError, MediaError
from uniperceiver.tasks.base import Task


@dataclass
class BatchSpec:
    """One planned draw: which task, which (epoch, index) samples, and the sampler state after it."""

    draw: int
    task: int
    samples: list[tuple[int, int]]
    state_after: tuple[int, int]


@dataclass
class LoadedBatch:
    """A collated batch (None when every sample failed to load) with its provenance."""

    spec: BatchSpec
    batch: dict[str, Any] | None
    ids: list[str]
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.ids)


def load_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation RNG of one sample: a function of (seed, epoch, index) only."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def collate_rng(seed: int, rank: int, draw: int) -> np.random.Generator:
    """The RNG of one batch's collate (mixup / cutmix): a function of (seed, rank, draw) only."""
    return np.random.default_rng([int(seed), 0xC011A7E, int(rank), int(draw)])


class TaskBatchDataset:
    """Map-style dataset whose keys are `BatchSpec`s: loads and collates one whole batch."""

    def __init__(self, tasks: Sequence[Task], examples: Sequence[Sequence[dict]], seed: int, rank: int = 0) -> None:
        self.tasks = list(tasks)
        # Lists are copied; other sequences (a streamed corpus's lazy windows) are kept as they are.
        self.examples = [list(e) if isinstance(e, (list, tuple)) else e for e in examples]
        self.seed = int(seed)
        self.rank = int(rank)

    def __len__(self) -> int:  # not used for sampling; DataLoader only needs __getitem__
        return sum(len(e) for e in self.examples)

    def __getitem__(self, spec: BatchSpec) -> LoadedBatch:
        task = self.tasks[spec.task]
        rows = self.examples[spec.task]
        items: list[dict] = []
        ids: list[str] = []
        skipped: dict[str, int] = {}
        for epoch, index in spec.samples:
            sample = rows[index]
            try:
                items.append(task.load(sample, train=True, rng=load_rng(self.seed, epoch, index)))
            except MediaError as exc:
                reason = f"{exc.kind}_media"
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            ids.append(str(sample.get("id", index)))
        batch = task.collate(items, train=True, rng=collate_rng(self.seed, self.rank, spec.draw)) if items else None
        return LoadedBatch(spec, batch, ids, skipped)


class _Plan(torch.utils.data.Sampler):
    """Yields the BatchSpecs from a starting state onwards (a private copy of every cursor)."""

    def __init__(self, chooser: TaskChooser, samplers: Sequence[ResumableBatchSampler], rank: int, draw: int) -> None:
        self.chooser = chooser
        self.samplers = samplers
        self.rank = rank
        self.draw = draw

    def __iter__(self) -> Iterator[BatchSpec]:
        draw = self.draw
        copies = [
            ResumableBatchSampler(
                s.num_samples, s.batch_size, seed=s.seed, key=s.key, rank=s.rank, world_size=s.world_size,
                shuffle=s.shuffle, state=BatchSamplerState(s.state.epoch, s.state.cursor),
            )
            for s in self.samplers
        ]
        while True:
            t = self.chooser.choose(self.rank, draw)
            samples, after = copies[t].next_batch()
            yield BatchSpec(draw, t, samples, (after.epoch, after.cursor))
            draw += 1

    def __len__(self) -> int:  # an endless stream; DataLoader never asks when batch_size is None
        raise TypeError("the plan is endless")


def _identity(x: Any) -> Any:
    return x


class MultiTaskLoader:
    """Endless iterator of LoadedBatch in plan order; `state_dict()` = what has been consumed."""

    def __init__(
        self,
        tasks: Sequence[Task],
        examples: Sequence[Sequence[dict]],
        *,
        weights: Sequence[float],
        batch_sizes: Sequence[int],
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
    ) -> None:
        if not (len(tasks) == len(examples) == len(weights) == len(batch_sizes)):
            raise ValueError("tasks, examples, weights and batch_sizes must have the same length")
        self.names = [t.cfg.name for t in tasks]
        self.dataset = TaskBatchDataset(tasks, examples, seed, rank)
        self.chooser = TaskChooser(weights, seed)
        self.samplers = [
            ResumableBatchSampler(len(ex), bs, seed=seed, key=name, rank=rank, world_size=world_size)
            for ex, bs, name in zip(examples, batch_sizes, self.names)
        ]
        self.seed = int(seed)
        self.rank = int(rank)
        self.draw = 0
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.prefetch_factor = int(prefetch_factor)
        self.skipped: dict[str, dict[str, int]] = {}
        self._empty_streak = [0] * len(tasks)
        self._it: Iterator[LoadedBatch] | None = None

    # -- iteration ---------------------------------------------------------------------------------
    def _start(self) -> Iterator[LoadedBatch]:
        plan = _Plan(self.chooser, self.samplers, self.rank, self.draw)
        if self.num_workers <= 0:
            return (self.dataset[spec] for spec in plan)
        # An explicit generator keeps DataLoader from drawing its base seed from the global torch
        # RNG, which would make a resumed run's model randomness (drop path) differ.
        loader = DataLoader(
            self.dataset,  # type: ignore[arg-type]
            batch_size=None,
            sampler=plan,
            num_workers=self.num_workers,
            collate_fn=_identity,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
            generator=torch.Generator().manual_seed(self.seed),
        )
        return iter(loader)

    def __iter__(self) -> "MultiTaskLoader":
        return self

    def __next__(self) -> LoadedBatch:
        if self._it is None:
            self._it = self._start()
        item = next(self._it)
        spec = item.spec
        if spec.draw != self.draw:  # cannot happen unless the plan and the state disagree
            raise RuntimeError(f"data plan out of order: expected draw {self.draw}, got {spec.draw}")
        self.draw = spec.draw + 1
        self.samplers[spec.task].state = BatchSamplerState(*spec.state_after)
        name = self.names[spec.task]
        if item.skipped:
            bucket = self.skipped.setdefault(name, {})
            for reason, n in item.skipped.items():
                bucket[reason] = bucket.get(reason, 0) + n
        if item.batch is None:
            self._empty_streak[spec.task] += 1
            if self._empty_streak[spec.task] > self.samplers[spec.task].batches_per_epoch() + 1:
                detail = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.get(name, {}).items()))
                raise DataError(
                    f"task {name!r}: no sample could be loaded for a whole epoch ({detail}); check the media "
                    f"under the dataset's raw root or run `upctl prepare` again"
                )
        else:
            self._empty_streak[spec.task] = 0
        return item

    def close(self) -> None:
        """Stop prefetching workers (the next `next()` restarts from the consumed state)."""
        self._it = None

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "draw": self.draw,
            "samplers": {name: s.state_dict() for name, s in zip(self.names, self.samplers)},
            "skipped": {k: dict(v) for k, v in self.skipped.items()},
        }

    def load_state_dict(self, state: dict[str, Any], strict_tasks: bool = False) -> list[str]:
        """Restore cursors; returns the names of tasks with no saved state (they start fresh)."""
        self.close()
        self.draw = int(state["draw"])
        missing = []
        saved = state.get("samplers", {})
        for name, sampler in zip(self.names, self.samplers):
            if name in saved:
                sampler.load_state_dict(saved[name])
            else:
                missing.append(name)
        if strict_tasks and missing:
            raise DataError(f"checkpoint has no data state for task(s) {missing}")
        self.skipped = {k: {r: int(n) for r, n in v.items()} for k, v in state.get("skipped", {}).items()}
        return missing


__all__ = ["BatchSpec", "LoadedBatch", "MultiTaskLoader", "TaskBatchDataset", "collate_rng", "load_rng"]
