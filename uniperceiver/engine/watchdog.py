"""The step watchdog: a rank that stops making progress says where it is stuck, and the job ends.

Without it, a rank that hangs without dying (a read on a dead network mount, a loader worker stuck
in a FIFO, a peer frozen in a collective) blocks every rank until the process group's timeout (30
minutes by default), and nothing says which rank or why. Each rank runs one `StepWatchdog`
thread; the loop marks its phase ("data", "forward/backward", "optimizer", "checkpoint") and each
finished optimizer step. When no step finishes within the limit (`train.step_timeout_s`, default
300 s past twice the slowest step seen, 900 s before the first), the thread:

1. writes every thread's stack (faulthandler) to `<run>/hang-rank<r>.txt` and to stderr,
2. names the phase, refined from the main thread's stack ("collective (all_gather)" when it waits
   inside torch.distributed), what the loader is reading (which process, which file, since when)
   and what every peer rank last reported (through the launcher's key-value store, so a frozen
   peer is named by the ranks waiting for it),
3. kills this rank's loader workers (one stuck in a read would outlive the job) and ends the
   process with `HANG_EXIT_CODE`; torchrun then stops the other ranks and names this one.

Nothing is written to the checkpoints: the last good checkpoint stays resumable. Periodic
evaluation pauses the clock (it has no step to wait for and may legitimately take long).
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

#: The exit status of a rank the watchdog ends (the `timeout` command's code).
HANG_EXIT_CODE = 124
#: Default limit: this much past twice the slowest step seen; before any step, FIRST_STEP_S.
MARGIN_S = 300.0
FIRST_STEP_S = 900.0
HEARTBEAT_PREFIX = "upctl/heartbeat/"


class PeerBoard:
    """Each rank's last phase in the launcher's key-value store (torchrun's rendezvous store).

    A separate client connection, so the watchdog thread never shares a socket with the process
    group; every call is best effort (a store that is gone only means peers are not named).
    """

    def __init__(self, rank: int, world_size: int, store: Any) -> None:
        self.rank = rank
        self.world_size = world_size
        self.store = store

    @classmethod
    def connect(cls, rank: int, world_size: int) -> "PeerBoard | None":
        """A board for a torchrun job (MASTER_ADDR / MASTER_PORT set), else None."""
        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if world_size <= 1 or not host or not port:
            return None
        try:
            import torch.distributed as dist

            store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=10),
                                  wait_for_workers=False)
        except (RuntimeError, ValueError, OSError):
            return None
        return cls(rank, world_size, store)

    def publish(self, report: dict[str, Any]) -> None:
        try:
            self.store.set(f"{HEARTBEAT_PREFIX}{self.rank}", json.dumps(report))
        except (RuntimeError, OSError):
            pass

    def peers(self) -> list[str]:
        """One phrase per other rank: its step and phase and how long ago it last reported."""
        out = []
        now = time.time()
        for r in range(self.world_size):
            if r == self.rank:
                continue
            key = f"{HEARTBEAT_PREFIX}{r}"
            try:
                if not self.store.check([key]):
                    out.append(f"rank {r} never reported")
                    continue
                rep = json.loads(self.store.get(key))
            except (RuntimeError, OSError, ValueError):
                out.append(f"rank {r}: unknown (the store does not answer)")
                continue
            silent = now - float(rep["time"])
            state = f"silent for {silent:.0f} s (frozen or dead)" if silent > 5 * rep["interval"] else "alive"
            out.append(f"rank {r} at step {rep['step']} in {rep['phase']} for {rep['in_phase_s']:.0f} s, {state}")
        return out


@dataclass
class WatchdogSpec:
    """What a rank's watchdog needs from the trainer."""

    rank: int
    world_size: int
    #: train.step_timeout_s (None = the default rule, see the module docstring).
    timeout_s: float | None
    #: Where `hang-rank<r>.txt` goes (the run folder).
    report_dir: Path
    #: Lines that say what the loader is reading now (the loader's `reading_now`).
    loading: Callable[[], list[str]] = field(default=lambda: [])
    #: Loader worker processes to kill before ending the rank.
    worker_pids: Callable[[], list[int]] = field(default=lambda: [])
    #: One line about what stays resumable (the last checkpoint).
    resumable: Callable[[], str] = field(default=lambda: "")


class StepWatchdog:
    """Watches one rank's loop from a daemon thread; see the module docstring."""

    def __init__(self, spec: WatchdogSpec, board: PeerBoard | None = None) -> None:
        self.spec = spec
        self.board = board
        self.step = 0
        self.phase_name = "start"
        self._phase_since = time.monotonic()
        self._mark = time.monotonic()
        self._slowest = 0.0
        self._paused = False
        self._stop = threading.Event()
        self._main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._watch, name=f"upctl-watchdog-rank{spec.rank}", daemon=True)

    # -- what the loop calls ---------------------------------------------------------------------------
    def __enter__(self) -> "StepWatchdog":
        self._main = threading.get_ident()
        self._mark = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def phase(self, name: str) -> None:
        """The loop enters `name` (data, forward/backward, optimizer, checkpoint)."""
        self.phase_name = name
        self._phase_since = time.monotonic()

    def step_done(self, step: int) -> None:
        """An optimizer step finished: the clock starts again; the slowest step sets the default limit."""
        now = time.monotonic()
        self._slowest = max(self._slowest, now - self._mark)
        self._mark = now
        self.step = step

    @contextmanager
    def paused(self, name: str) -> Iterator[None]:
        """No limit while `name` runs (periodic evaluation); the clock restarts after it."""
        self.phase(name)
        self._paused = True
        try:
            yield
        finally:
            self._paused = False
            self._mark = time.monotonic()

    def limit(self) -> float:
        if self.spec.timeout_s is not None:
            return float(self.spec.timeout_s)
        return FIRST_STEP_S if self._slowest == 0.0 else 2 * self._slowest + MARGIN_S

    # -- the thread ----------------------------------------------------------------------------------
    def _interval(self) -> float:
        return min(5.0, max(0.2, self.limit() / 10))

    def _watch(self) -> None:
        while not self._stop.wait(self._interval()):
            now = time.monotonic()
            if self.board is not None:
                self.board.publish({"step": self.step, "phase": self.phase_name, "time": time.time(),
                                    "in_phase_s": now - self._phase_since, "interval": self._interval()})
            if not self._paused and now - self._mark > self.limit():
                self._fire(now - self._mark)
                return

    def _fire(self, waited: float) -> None:
        """Report, kill the loader workers, end the process (never returns)."""
        spec = self.spec
        phase = self._refined_phase()
        parts = [f"rank {spec.rank}: no optimizer step finished for {waited:.1f} s (limit {self.limit():.0f} s, "
                 f"train.step_timeout_s); stuck in {phase} at step {self.step + 1}"]
        parts += spec.loading()
        if self.board is not None:
            parts += self.board.peers()
        stacks = self._write_stacks(" | ".join(parts))
        if stacks is not None:
            parts.append(f"stacks of every thread in {stacks}")
        resumable = spec.resumable()
        if resumable:
            parts.append(resumable)
        line = "; ".join(parts)
        _write_stderr(f"error: {line}\n")
        for pid in spec.worker_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        os._exit(HANG_EXIT_CODE)

    def _refined_phase(self) -> str:
        """The loop's phase, plus the torch.distributed call the main thread waits in, if any."""
        frame = sys._current_frames().get(self._main) if self._main is not None else None
        collective = None
        while frame is not None:
            name = frame.f_code.co_filename.replace("\\", "/")
            if "/torch/distributed/" in name and collective is None:
                collective = frame.f_code.co_name
            frame = frame.f_back
        if collective is not None:
            return f"a collective ({collective}, during {self.phase_name})"
        return self.phase_name

    def _write_stacks(self, header: str) -> Path | None:
        """Every thread's stack into the run folder and onto stderr (faulthandler needs no GIL-free luck)."""
        main_frame = sys._current_frames().get(self._main) if self._main is not None else None
        main_stack = "".join(traceback.format_stack(main_frame)) if main_frame is not None else ""
        _write_stderr(f"rank {self.spec.rank}: stack of the main thread:\n{main_stack}")
        path = Path(self.spec.report_dir) / f"hang-rank{self.spec.rank}.txt"
        try:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(header + "\n\nmain thread:\n" + main_stack + "\nall threads (faulthandler):\n")
                fh.flush()
                faulthandler.dump_traceback(file=fh, all_threads=True)
        except OSError:
            return None
        return path


def _write_stderr(text: str) -> None:
    """Straight to file descriptor 2: the main thread may hold a console's lock while it hangs."""
    data = text.encode("utf-8", "replace")
    while data:
        try:
            n = os.write(2, data)
        except OSError:
            return
        data = data[n:]


__all__ = ["HANG_EXIT_CODE", "PeerBoard", "StepWatchdog", "WatchdogSpec"]
