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

Loader workers can die (the OOM killer's SIGKILL) or hang (a read on a dead network mount). What
each loading process reads, and since when, sits in shared memory (`LoadTracker`), so the main
process can name the worker and the file in either case. A dead worker is survived: the workers
are restarted from the consumed state and the missing draw is re-read (the plan is deterministic,
so the batches are exactly those of an undisturbed run), counted in `worker_restarts` and said
through `say`; a draw that kills its worker `MAX_DEATHS_PER_DRAW` times is a DataError naming the
file. A hang is the step watchdog's to report (engine/watchdog.py reads `reading_now()`).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from uniperceiver.engine.sampler import BatchSamplerState, ResumableBatchSampler, TaskChooser
from uniperceiver.errors import DataError, MediaError
from uniperceiver.tasks.base import Task

#: A draw whose loading killed its worker this often is not retried again (out of memory each time).
MAX_DEATHS_PER_DRAW = 3
_WORKER_DIED = re.compile(r"DataLoader worker \(pid\(s\) ([\d, ]+)\) exited unexpectedly")


@dataclass
class BatchSpec:
    """One planned draw: which task, which (epoch, index) samples, and the sampler state after it."""

    draw: int
    task: int
    samples: list[tuple[int, int]]
    state_after: BatchSamplerState


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


@dataclass
class Reading:
    """What one loading process reads now (`what` is "" between samples)."""

    slot: int
    pid: int
    since: float
    what: str

    @property
    def who(self) -> str:
        return "the main process" if self.slot == 0 else f"loader worker {self.slot - 1} (pid {self.pid})"


class LoadTracker:
    """Per loading process (slot 0: the main process, slot i+1: worker i): its pid, the sample it
    is reading and since when, in shared memory written before every `task.load`.

    Why shared memory: a worker stuck in a read cannot answer, and a dead one cannot say what
    killed it; the main process reads the slots without their help.
    """

    SLOT = 1024

    def __init__(self, workers: int) -> None:
        self.slots = int(workers) + 1
        self._buf = multiprocessing.RawArray(ctypes.c_char, self.slots * self.SLOT)

    @staticmethod
    def _slot() -> int:
        info = torch.utils.data.get_worker_info()
        return 0 if info is None else info.id + 1

    def enter(self, what: str) -> None:
        """This process starts reading `what`."""
        self._write(self._slot(), f"{os.getpid()}\t{time.time():.3f}\t{what}")

    def leave(self) -> None:
        self._write(self._slot(), f"{os.getpid()}\t{time.time():.3f}\t")

    def clear(self) -> None:
        for i in range(self.slots):
            self._write(i, "")

    def _write(self, slot: int, text: str) -> None:
        data = text.encode("utf-8", "replace")[: self.SLOT - 1] + b"\0"
        start = slot * self.SLOT
        self._buf[start : start + len(data)] = data

    def readings(self) -> list[Reading]:
        out = []
        for i in range(self.slots):
            raw = bytes(self._buf[i * self.SLOT : (i + 1) * self.SLOT]).split(b"\0", 1)[0].decode("utf-8", "replace")
            pid, _, rest = raw.partition("\t")
            since, _, what = rest.partition("\t")
            if pid.isdigit():
                out.append(Reading(i, int(pid), float(since or 0.0), what))
        return out


class TaskBatchDataset:
    """Map-style dataset whose keys are `BatchSpec`s: loads and collates one whole batch."""

    def __init__(self, tasks: Sequence[Task], examples: Sequence[Sequence[dict]], seed: int, rank: int = 0,
                 tracker: LoadTracker | None = None) -> None:
        self.tasks = list(tasks)
        self.tracker = tracker
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
            if self.tracker is not None:
                self.tracker.enter(_describe(task, sample, spec.draw))
            try:
                items.append(task.load(sample, train=True, rng=load_rng(self.seed, epoch, index)))
            except MediaError as exc:
                reason = f"{exc.kind}_media"
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            finally:
                if self.tracker is not None:
                    self.tracker.leave()
            ids.append(str(sample.get("id", index)))
        batch = task.collate(items, train=True, rng=collate_rng(self.seed, self.rank, spec.draw)) if items else None
        return LoadedBatch(spec, batch, ids, skipped)


def _describe(task: Task, sample: dict, draw: int) -> str:
    """`<media file> (sample <id> of task <name>, draw <n>)`, or without the file for text samples."""
    where = f"sample {sample.get('id')!r} of task {task.cfg.name!r}, draw {draw}"
    if sample.get("media") is None:
        return where
    try:
        return f"{task.dataset.media_path(sample)} ({where})"
    except DataError:  # an escaping path: task.load reports it
        return f"{sample.get('media')} ({where})"


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
                shuffle=s.shuffle, state=replace(s.state),
            )
            for s in self.samplers
        ]
        while True:
            t = self.chooser.choose(self.rank, draw)
            samples, after = copies[t].next_batch()
            yield BatchSpec(draw, t, samples, after)
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
        say: Callable[[str], None] | None = None,
    ) -> None:
        if not (len(tasks) == len(examples) == len(weights) == len(batch_sizes)):
            raise ValueError("tasks, examples, weights and batch_sizes must have the same length")
        self.names = [t.cfg.name for t in tasks]
        self.tracker = LoadTracker(max(0, int(num_workers)))
        self.dataset = TaskBatchDataset(tasks, examples, seed, rank, self.tracker)
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
        self.say = say or (lambda message: None)
        #: Draws re-read because a loader worker died (saved with the cursors).
        self.worker_restarts = 0
        self._deaths = (-1, 0)  # (draw, how many times its loading killed a worker)

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
        self.tracker.clear()
        return _without_async_worker_errors(loader)

    def __iter__(self) -> "MultiTaskLoader":
        return self

    def __next__(self) -> LoadedBatch:
        item = None
        while item is None:
            if self._it is None:
                self._it = self._start()
            item = self._next_or_survive()
        spec = item.spec
        if spec.draw != self.draw:  # cannot happen unless the plan and the state disagree
            raise RuntimeError(f"data plan out of order: expected draw {self.draw}, got {spec.draw}")
        self.draw = spec.draw + 1
        self.samplers[spec.task].state = replace(spec.state_after)
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

    def _next_or_survive(self) -> LoadedBatch | None:
        """The next batch, or None after a dead worker (the workers are restarted from the consumed
        state, so the draw it was loading is read again)."""
        assert self._it is not None
        try:
            return next(self._it)
        except RuntimeError as exc:
            found = _WORKER_DIED.search(str(exc))
            if found is None:
                raise
            pids = [int(p) for p in found.group(1).replace(" ", "").split(",") if p]
        readings = {r.pid: r for r in self.tracker.readings()}
        lost = [readings[p] for p in pids if p in readings]
        what = "; ".join(f"{r.who} died while reading {r.what or 'nothing (between samples)'}" for r in lost)
        what = what or f"loader worker pid(s) {', '.join(map(str, pids))} died"
        draw, times = self._deaths
        times = times + 1 if draw == self.draw else 1
        self._deaths = (self.draw, times)
        self.close()
        if times >= MAX_DEATHS_PER_DRAW:
            raise DataError(f"{what}: draw {self.draw} killed a loader worker {times} times (out of memory?); "
                            "lower train.num_workers or the batch size, or check that file")
        self.worker_restarts += 1
        self.say(f"{what}; loader workers restarted, draw {self.draw} is read again "
                 f"({self.worker_restarts} restart(s) in this run)")
        return None

    def reading_now(self) -> list[str]:
        """What every loading process is reading now and for how long (for the step watchdog)."""
        now = time.time()
        out = [f"{r.who} has been reading {r.what} for {now - r.since:.1f} s"
               for r in self.tracker.readings() if r.what]
        return out or ["the loader reads nothing right now"]

    def worker_pids(self) -> list[int]:
        """Pids of the loader workers that have read something (the main process excluded)."""
        return [r.pid for r in self.tracker.readings() if r.slot > 0 and r.pid != os.getpid()]

    def close(self) -> None:
        """Stop prefetching workers (the next `next()` restarts from the consumed state)."""
        self._it = None

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "draw": self.draw,
            "samplers": {name: s.state_dict() for name, s in zip(self.names, self.samplers)},
            "skipped": {k: dict(v) for k, v in self.skipped.items()},
            "worker_restarts": self.worker_restarts,
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
        self.worker_restarts = int(state.get("worker_restarts", 0))
        return missing


def _without_async_worker_errors(loader: DataLoader) -> Iterator[LoadedBatch]:
    """`iter(loader)` without torch's SIGCHLD handler, which raises a dead worker's error from
    whatever the main thread runs at that moment (half way through a checkpoint write). Without
    it the death surfaces where it can be handled: the next batch (within 5 s, torch's status
    check), which `MultiTaskLoader` survives."""
    if threading.current_thread() is not threading.main_thread():
        return iter(loader)
    before = signal.getsignal(signal.SIGCHLD)
    it = iter(loader)
    signal.signal(signal.SIGCHLD, before if before is not None else signal.SIG_DFL)
    return it


__all__ = ["BatchSpec", "LoadTracker", "Reading", "LoadedBatch", "MultiTaskLoader", "TaskBatchDataset", "collate_rng", "load_rng"]
