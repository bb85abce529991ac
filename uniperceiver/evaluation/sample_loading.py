"""Decode an evaluation shard's samples in the main process or in DataLoader workers, in split order.

Why workers: `task.load` decodes images and videos, and in the main process an accelerator waits
for every decode. With `num_workers` > 0 the shard is cut into chunks of consecutive indices
(one batch each), workers load whole chunks ahead, and the DataLoader hands them back in order;
the harness batches exactly as it does from the main process, so predictions are identical.

A sample's augmentation RNG is `default_rng([0, index])` wherever it is loaded. Unreadable media
(`MediaError`) become a skip reason beside the index, counted by the harness as before; another
`UpctlError` in a worker comes back as a value and is raised in the main process with its own
one-line message (not DataLoader's wrapped traceback).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from uniperceiver.errors import MediaError, UpctlError
from uniperceiver.tasks.base import Task

#: One sample's outcome: (split index, loaded item or None, skip reason such as "missing_media" or None).
Loaded = tuple[int, "dict[str, Any] | None", "str | None"]


def load_chunk(task: Task, examples: Sequence[dict], indices: Sequence[int]) -> list[Loaded]:
    """Load the samples at `indices` for evaluation; unreadable media become skip reasons."""
    out: list[Loaded] = []
    for idx in indices:
        try:
            item = task.load(examples[idx], train=False, rng=np.random.default_rng([0, idx]))
        except MediaError as exc:
            out.append((idx, None, f"{exc.kind}_media"))
        else:
            out.append((idx, item, None))
    return out


class _Chunks(Dataset):
    """Chunk j of the shard, loaded in whichever process asks (a forked worker inherits the task)."""

    def __init__(self, task: Task, examples: Sequence[dict], chunks: list[list[int]]) -> None:
        self.task, self.examples, self.chunks = task, examples, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, j: int) -> list[Loaded] | UpctlError:
        try:
            return load_chunk(self.task, self.examples, self.chunks[j])
        except UpctlError as exc:  # MediaError is handled per sample; this is bad data or config
            return exc


def _identity(x: Any) -> Any:
    return x


def iter_loaded(task: Task, examples: Sequence[dict], indices: Sequence[int], chunk: int,
                num_workers: int = 0) -> Iterator[Loaded]:
    """Every index of `indices` loaded, in that order; chunks of `chunk` indices go to `num_workers`
    DataLoader workers (0: load here, one sample at a time as it is asked for)."""
    if num_workers < 0:
        raise UpctlError(f"evaluation workers must be 0 or more, got {num_workers}")
    chunk = max(1, int(chunk))
    chunks = [list(indices[i : i + chunk]) for i in range(0, len(indices), chunk)]
    if num_workers == 0:
        for part in chunks:
            yield from load_chunk(task, examples, part)
        return
    loader = DataLoader(
        _Chunks(task, examples, chunks),
        batch_size=None,
        shuffle=False,
        num_workers=min(int(num_workers), max(1, len(chunks))),
        collate_fn=_identity,
        # Its own generator: DataLoader would otherwise draw a base seed from the global torch RNG,
        # and a periodic evaluation would shift the training run's randomness.
        generator=torch.Generator().manual_seed(0),
    )
    for result in loader:
        if isinstance(result, UpctlError):
            raise result
        yield from result
