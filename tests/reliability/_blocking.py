"""Real faults for the hang and loader tests: a medium whose read blocks, the media a rank reads at
a given draw, the loader worker processes of a run.

A file whose `open()` blocks: the test process takes a write lease on it (fcntl F_SETLEASE) and
never gives it up; the kernel then makes every other process's open() wait for the lease to be
broken (`/proc/sys/fs/lease-break-time`, 45 s by default), as a read on a dead network mount
waits. The file stays a regular file with valid content, so nothing in the loader can tell.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from uniperceiver.engine.sampler import ResumableBatchSampler
from uniperceiver.modeling.model_config import model_config
from uniperceiver.tasks.catalog import build_task, task_config

from .conftest import SMALL_MODEL

LEASE_BREAK = Path("/proc/sys/fs/lease-break-time")


@contextmanager
def blocked_open(path: Path) -> Iterator[None]:
    """Every open() of `path` by another process blocks while this context lasts (up to the lease
    break time, which must exceed what the test waits)."""
    if not LEASE_BREAK.is_file() or int(LEASE_BREAK.read_text()) < 30:
        pytest.skip("needs Linux file leases with a lease-break-time of at least 30 s")
    old = signal.signal(signal.SIGIO, signal.SIG_IGN)  # the kernel asks the holder to let go by SIGIO
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        yield
    finally:
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        finally:
            os.close(fd)
            signal.signal(signal.SIGIO, old)


def copy_digits(mini_data: Path, dst: Path) -> Path:
    """A private copy of the prepared mini-digits dataset and its images (tests damage the copy)."""
    src = mini_data / "mini-digits"
    data, raw = dst / "data", dst / "raw"
    meta = json.loads((src / "meta.json").read_text())
    shutil.copytree(src, data / "mini-digits")
    shutil.copytree(Path(meta["raw_root"]), raw)
    meta["raw_root"] = str(raw)
    (data / "mini-digits" / "meta.json").write_text(json.dumps(meta))
    return data


def media_of_draw(data_dir: Path, task: str, batch_size: int, seed: int, draw: int, rank: int = 0,
                  world_size: int = 1) -> list[Path]:
    """The media files `rank` loads for its `draw`-th batch of a one-task run (the seeded plan)."""
    built = build_task(task_config(task), data_dir, model_config("tiny", **SMALL_MODEL))
    rows = built.examples("train")
    sampler = ResumableBatchSampler(len(rows), batch_size, seed=seed, key=task, rank=rank, world_size=world_size)
    for _ in range(draw):
        sampler.next_batch()
    batch, _ = sampler.next_batch()
    return [built.dataset.media_path(rows[i]) for _, i in batch]


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
