"""`TrainState`: everything the training loop carries from one optimizer step to the next.

Why one dataclass: exact resume means restoring every value the loop reads that is not a model,
optimizer or schedule tensor (the step, the data cursors, the RNG streams, the loss scale, the open
logging window, ...). Kept in one place, a value cannot be saved and then forgotten on resume, and
the checkpoint writes and reads it as one unit (`train_checkpoint.save_training_checkpoint` /
`load_checkpoint(...).state`).

Two parts, because ranks differ in some values and agree on others:
- shared (identical on every rank; rank 0 writes it to `trainer.pt`): step, skipped steps, the
  world size that wrote it, the fp16 loss scale, the logging window, the periodic-eval scores;
- per rank (`rng-rank<r>.pt`): this rank's data cursors and RNG states. They live in the loader
  and the global generators while training: `snapshot` copies them in before a save, `restore`
  puts them back on resume (the RNG last, so nothing after it draws a different number).

Checkpoints written before this state had a version (`STATE_VERSION`) are refused with one line.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from uniperceiver.engine.sampler import BatchSamplerState, rederive_states
from uniperceiver.errors import CheckpointError

if TYPE_CHECKING:
    from uniperceiver.engine.loader import MultiTaskLoader

#: Version of the saved TrainState (trainer.pt / rng-rank<r>.pt): bump when a field changes meaning.
STATE_VERSION = 2

#: One micro-step in the logging window: (task name, loss, the task's statistics).
WindowRow = tuple[str, float, dict[str, float]]


@dataclass
class LogWindow:
    """The micro-steps since the last metrics row, so a run resumed between two rows writes the same rows."""

    rows: list[WindowRow] = field(default_factory=list)
    samples: int = 0

    def add(self, task: str, loss: float, stats: dict[str, float], samples: int) -> None:
        self.rows.append((task, loss, dict(stats)))
        self.samples += samples

    def clear(self) -> None:
        self.rows, self.samples = [], 0


@dataclass
class TrainState:
    """The loop's state between optimizer steps (see the module docstring for what goes where)."""

    #: Optimizer steps done (skipped non-finite steps included: the schedule advanced for them).
    step: int = 0
    #: Steps whose update was dropped by nan_policy "skip".
    skipped_steps: int = 0
    #: World size of the run that saved the state (the per-rank cursors are per rank of that world).
    world_size: int = 1
    #: GradScaler state when fp16 loss scaling is on (scale, growth tracker), else None.
    loss_scale: dict[str, Any] | None = None
    window: LogWindow = field(default_factory=LogWindow)
    #: Periodic-evaluation scores by step ({"task/metric": value}).
    evals: dict[int, dict[str, float]] = field(default_factory=dict)
    #: This rank's data cursors (`MultiTaskLoader.state_dict()`: draw, per-task epoch / cursor,
    #: skipped media); None when the checkpoint has none for this rank.
    data: dict[str, Any] | None = None
    #: This rank's python / numpy / torch (/ CUDA) RNG states (`capture_rng_state`); None as `data`.
    rng: dict[str, Any] | None = None
    #: Every saving rank's data cursors, read only when resuming on another world size (`restore`
    #: re-derives this rank's cursors from all of them); None otherwise.
    peers: list[dict[str, Any]] | None = None

    # -- live objects <-> state ----------------------------------------------------------------------
    def snapshot(self, loader: MultiTaskLoader, scaler: torch.amp.GradScaler, world_size: int) -> None:
        """Copy what lives outside the state while training (cursors, RNG, loss scale) into it."""
        self.data = loader.state_dict()
        self.rng = capture_rng_state()
        self.loss_scale = scaler.state_dict() if scaler.is_enabled() else None
        self.world_size = int(world_size)

    def restore(self, loader: MultiTaskLoader, scaler: torch.amp.GradScaler, say: Callable[[str], None]) -> None:
        """Put a resumed state's cursors, loss scale and RNG back (RNG last). Messages go to `say`.

        On another world size than the one that saved (`peers` set), this rank's cursors are
        re-derived from every saved rank's (`rederive_loader_state`): the epoch in progress goes on
        without a sample repeated or skipped. Ranks the old run did not have keep their fresh seed.
        """
        if self.loss_scale is not None:
            scaler.load_state_dict(self.loss_scale)
        if self.peers is not None:
            world = loader.samplers[0].world_size
            self.data = rederive_loader_state(self.peers, loader, world)
            say(f"resuming a {self.world_size}-rank checkpoint on {world} rank(s): every task's data cursors were "
                "re-derived, so no sample of the epoch in progress is repeated or skipped")
            self.peers = None
        elif self.data is None or self.rng is None:
            say(f"the checkpoint has no state for this rank (it was written by {self.world_size} rank(s)): "
                "data cursors restart")
            return
        fresh = loader.load_state_dict(self.data)
        if fresh:
            say(f"checkpoint has no data cursor for task(s) {', '.join(fresh)}: they start from the beginning")
        if self.rng is not None:
            restore_rng_state(self.rng)

    # -- state <-> checkpoint files ------------------------------------------------------------------
    def shared_dict(self) -> dict[str, Any]:
        """The `trainer.pt` content: plain containers only (read back with weights_only=True)."""
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "world_size": self.world_size,
            "loss_scale": self.loss_scale,
            "log_window": [(n, v, dict(st)) for n, v, st in self.window.rows],
            "log_window_samples": self.window.samples,
            "evals": {int(s): dict(v) for s, v in self.evals.items()},
        }

    def rank_dict(self) -> dict[str, Any] | None:
        """The `rng-rank<r>.pt` content, or None when the state holds nothing for this rank."""
        if self.data is None or self.rng is None:
            return None
        return {"data": self.data, "rng": self.rng}

    @classmethod
    def from_dicts(cls, shared: dict[str, Any], rank: dict[str, Any] | None, source: str,
                   peers: list[dict[str, Any]] | None = None) -> "TrainState":
        """The state a checkpoint saved; `source` names the folder in errors; `peers`: every saved
        rank's part, when resuming on another world size."""
        if not isinstance(shared, dict) or shared.get("version") != STATE_VERSION:
            found = shared.get("version") if isinstance(shared, dict) else None
            raise CheckpointError(
                f"{source}/trainer.pt: training state version {found!r}, expected {STATE_VERSION} (a checkpoint "
                "of an older upctl; resume it with that version or start a new run)"
            )
        if rank is not None and not (isinstance(rank, dict) and {"data", "rng"} <= set(rank)):
            raise CheckpointError(f"{source}: a rank state file without 'data' and 'rng'")
        try:
            window = LogWindow([(str(n), float(v), dict(st)) for n, v, st in shared["log_window"]],
                               int(shared["log_window_samples"]))
            return cls(
                step=int(shared["step"]),
                skipped_steps=int(shared["skipped_steps"]),
                world_size=int(shared["world_size"]),
                loss_scale=shared["loss_scale"],
                window=window,
                evals={int(s): {str(k): float(x) for k, x in v.items()} for s, v in shared["evals"].items()},
                data=None if rank is None else rank["data"],
                rng=None if rank is None else rank["rng"],
                peers=None if peers is None else [p["data"] for p in peers],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}/trainer.pt: malformed training state ({type(exc).__name__}: {exc})") from None


# -- another world size on resume ------------------------------------------------------------------


def rederive_loader_state(peers: list[dict[str, Any]], loader: MultiTaskLoader, world_size: int) -> dict[str, Any]:
    """This rank's loader state (`MultiTaskLoader.state_dict()` form) for `world_size` ranks, from the
    states of every rank of the saving run (`peers`, by rank).

    Per task, `sampler.rederive_states` deals what the old ranks had left to the new ones. The draw
    counter (task choice, collate RNG) is the old rank's own, else the furthest one; the skipped-media
    counts are summed onto rank 0 so the run's totals stay right.
    """
    rank = loader.rank
    samplers: dict[str, dict[str, Any]] = {}
    for name, sampler in zip(loader.names, loader.samplers):
        saved = [p["samplers"].get(name) for p in peers]
        if any(s is None for s in saved):
            continue  # a task the old run did not have: starts fresh (restore says so)
        n = sampler.num_samples
        if n < max(len(peers), world_size):
            raise CheckpointError(
                f"cannot resume a {len(peers)}-rank checkpoint on {world_size} rank(s): task {name!r} has {n} training "
                f"sample(s), fewer than the ranks, so its cursors cannot be re-derived; resume with "
                f"{len(peers)} rank(s) (torchrun --nproc-per-node {len(peers)})"
            )
        states = [BatchSamplerState(int(s["epoch"]), int(s["cursor"]), tuple(s.get("pending", ()))) for s in saved]
        samplers[name] = rederive_states(states, n, world_size)[rank].to_dict()
    skipped: dict[str, dict[str, int]] = {}
    if rank == 0:
        for p in peers:
            for task, kinds in p.get("skipped", {}).items():
                bucket = skipped.setdefault(task, {})
                for kind, count in kinds.items():
                    bucket[kind] = bucket.get(kind, 0) + int(count)
    draws = [int(p["draw"]) for p in peers]
    return {"draw": draws[rank] if rank < len(draws) else max(draws), "samplers": samplers, "skipped": skipped}


# -- RNG states (plain containers and tensors only) -------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy (legacy global), torch CPU and CUDA RNG states as weights_only-safe objects."""
    py = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((int(py[0]), tuple(int(x) for x in py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": int(n["pos"])},
            "has_gauss": int(n["has_gauss"]),
            "gauss": float(n["gauss"]),
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


__all__ = [
    "LogWindow", "STATE_VERSION", "TrainState", "WindowRow", "capture_rng_state", "rederive_loader_state",
    "restore_rng_state",
]
