"""The training loop as named steps over one `TrainState`.

    run_loop(loop, state)                          until loop.total steps, or SIGTERM
      train_step(loop, state)                      one optimizer step:
        micro_step(loop, state, i)  x grad_accum     forward + backward of one task batch
        optimizer_step(loop, state, micros)          agree on finiteness, clip, update or apply
                                                     nan_policy, advance the schedule and the step
      after_step(loop, state, outcome)             metrics row, progress, periodic evaluation,
                                                   SIGTERM (save and stop), periodic checkpoint
        save_checkpoint(loop, state)

`Loop` holds what the steps read and never replace (model, optimizer, data, hooks, recipe);
everything that changes from one step to the next and must survive a resume is in the
`TrainState` (train_state.py), so a checkpoint is `Loop.parts` + `TrainState`.

Each step tells the rank's `StepWatchdog` (watchdog.py) which phase it is in (data,
forward/backward, optimizer, checkpoint) and when an optimizer step finished, so a rank that
hangs names its phase instead of waiting silently for the collective timeout.
"""

from __future__ import annotations

import math
import signal
from contextlib import nullcontext
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from uniperceiver.config.schema import Recipe
from uniperceiver.engine import runs
from uniperceiver.engine import train_checkpoint as ckpt
from uniperceiver.engine.distributed import DistEnv, any_flag, clip_gradients, finish_grads, skip_grad_sync
from uniperceiver.engine.loader import LoadedBatch, MultiTaskLoader
from uniperceiver.engine.periodic_eval import PeriodicEval
from uniperceiver.engine.targets import StepTargets, TargetSets
from uniperceiver.engine.train_state import LogWindow, TrainState
from uniperceiver.engine.watchdog import StepWatchdog
from uniperceiver.errors import CheckpointError, UpctlError
from uniperceiver.modeling.model import UniPerceiver
from uniperceiver.tasks.base import Task

Log = Callable[[str], None]


class TrainingDiverged(UpctlError):
    """A non-finite loss or gradient norm with nan_policy "stop"."""


@dataclass
class StepReport:
    """What the progress callback receives after every optimizer step (rank 0)."""

    step: int
    total: int
    loss: float
    lr: float
    samples_per_s: float
    eta_s: float | None
    task: str
    grad_norm: float | None = None


class StepModule(nn.Module):
    """The forward of one micro-step, as a module so DDP sees every parameter the step used."""

    def __init__(self, model: UniPerceiver) -> None:
        super().__init__()
        self.model = model

    def forward(self, task: Task, batch: dict[str, Any], targets: StepTargets) -> tuple[Tensor, dict[str, float]]:
        feats, tie = targets.encode(self.model)
        loss, stats = task.loss(self.model, batch, feats)
        if tie is not None:
            loss = loss + tie
        return loss, stats


class SigtermFlag:
    """SIGTERM sets a flag checked after each step (only installable in the main thread)."""

    def __init__(self) -> None:
        self.raised = False
        self._old: Any = None

    def __enter__(self) -> "SigtermFlag":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


@dataclass
class Hooks:
    """How the loop reports and what it watches. `progress` and `say` reach the caller on rank 0
    only; `sigterm` is None when the caller handles signals itself."""

    progress: Callable[[StepReport], None] | None
    say: Log
    evaluate: PeriodicEval
    sigterm: SigtermFlag | None = None


@dataclass
class Loop:
    """What the steps read (built once per stage by the trainer); the changing part is the TrainState."""

    recipe: Recipe
    env: DistEnv
    parts: ckpt.Trainables
    #: `StepModule(parts.model)` under DDP / FSDP (the module itself on one process).
    wrapped: nn.Module
    tasks: list[Task]
    targets: TargetSets
    amp_dtype: torch.dtype | None
    total: int
    run_dir: Path
    hooks: Hooks
    #: rank 0's metrics.csv / TensorBoard writer (None elsewhere).
    metrics: runs.MetricsLog | None
    began: float
    #: The parameters that train, as the optimizer holds them (FSDP: the sharded ones, taken right
    #: after wrapping; the module swaps in unsharded ones while it computes).
    trainable: list[nn.Parameter]
    #: (step, task, loss) of every micro-step this process trained (not those before a resume).
    history: list[tuple[int, str, float]] = field(default_factory=list)
    #: The newest published checkpoint, or the one resumed from (named when training diverges or
    #: hangs; an asynchronous save still in writing is `parts.pending`, see `newest_checkpoint`).
    last_checkpoint: Path | None = None
    step_times: deque[float] = field(default_factory=lambda: deque(maxlen=20))
    window_start: float = field(default_factory=time.perf_counter)
    #: This rank's hang detector (None: nothing watches, e.g. a loop driven by a test).
    watchdog: StepWatchdog | None = None

    def phase(self, name: str) -> None:
        """Tell the watchdog what the loop does now."""
        if self.watchdog is not None:
            self.watchdog.phase(name)


@dataclass
class MicroOutcome:
    """One micro-step: its task, loss and samples (ids for the divergence message)."""

    task: str
    loss: float
    ids: list[str]
    samples: int

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss)


@dataclass
class StepOutcome:
    """One optimizer step: its micro-steps, the lr it used, the gradient norm (None when skipped)."""

    micros: list[MicroOutcome]
    lr: float
    grad_norm: float | None
    seconds: float

    @property
    def tasks(self) -> str:
        return "+".join(dict.fromkeys(m.task for m in self.micros))

    @property
    def mean_loss(self) -> float:
        finite = [m.loss for m in self.micros if m.finite]
        return float(np.mean(finite)) if finite else float("nan")


# -- the loop ---------------------------------------------------------------------------------------


def run_loop(loop: Loop, state: TrainState) -> bool:
    """Train until `loop.total` steps; True when SIGTERM stopped it (a checkpoint was saved)."""
    while state.step < loop.total:
        outcome = train_step(loop, state)
        if after_step(loop, state, outcome):
            return True
    return False


def train_step(loop: Loop, state: TrainState) -> StepOutcome:
    """One optimizer step: `grad_accum` micro-steps, then the update."""
    t0 = time.perf_counter()
    lr = loop.parts.scheduler.current_lr()
    micros = [micro_step(loop, state, i) for i in range(loop.recipe.train.grad_accum)]
    grad_norm = optimizer_step(loop, state, micros)
    return StepOutcome(micros, lr, grad_norm, time.perf_counter() - t0)


def micro_step(loop: Loop, state: TrainState, micro: int) -> MicroOutcome:
    """Forward and backward of this rank's next task batch; gradients accumulate, synced on the last."""
    env, accum = loop.env, loop.recipe.train.grad_accum
    loop.phase("data")
    item = _next_nonempty(loop.parts.loader)
    loop.phase("forward/backward")
    if env.device.type == "cuda":
        item.batch = _to_device(item.batch, env.device)
    task = loop.tasks[item.spec.task]
    plan = loop.targets.plan(item.spec.task, state.step, micro, env)
    with skip_grad_sync(loop.wrapped, env.distributed and micro < accum - 1):
        with torch.autocast(env.device.type, dtype=loop.amp_dtype, enabled=loop.amp_dtype is not None):
            loss, stats = loop.wrapped(task, item.batch, plan)
        value = float(loss.detach().float().item())
        if math.isfinite(value) or env.distributed:  # DDP needs every backward it started
            weighted = loss.float() * float(task.cfg.loss_weight) / accum
            loop.parts.scaler.scale(weighted).backward()
    name = task.cfg.name
    state.window.add(name, value, stats, item.size)
    loop.history.append((state.step + 1, name, value))
    return MicroOutcome(name, value, item.ids, item.size)


def optimizer_step(loop: Loop, state: TrainState, micros: list[MicroOutcome]) -> float | None:
    """Finish the gradients, agree across ranks that the step is finite, then update (or apply
    train.nan_policy: "stop" raises TrainingDiverged, "skip" drops the update). Returns the
    gradient norm before clipping (None when a loss was not finite)."""
    parts, env = loop.parts, loop.env
    loop.phase("optimizer")
    finish_grads(loop.wrapped, env)
    first_bad = next((m for m in micros if not m.finite), None)
    bad = None if first_bad is None else (first_bad.task, first_bad.ids, first_bad.loss)
    any_bad = any_flag(bad is not None, env)
    grad_norm: float | None = None
    if not any_bad:
        parts.scaler.unscale_(parts.optimizer)
        clip = float(loop.recipe.optim.clip_grad or 0.0)
        grad_norm = float(clip_gradients(loop.trainable, clip if clip > 0 else float("inf")))
        if not math.isfinite(grad_norm) and not parts.scaler.is_enabled():
            bad, any_bad = (",".join(dict.fromkeys(m.task for m in micros)), [], grad_norm), True
    if any_bad:
        if loop.recipe.train.nan_policy == "stop":
            _publish_before_stopping(loop)
            raise _diverged(state.step + 1, bad, env, loop.last_checkpoint)
        state.skipped_steps += 1
        parts.optimizer.zero_grad(set_to_none=True)  # (the fp16 scaler keeps its scale)
        loop.hooks.say(f"step {state.step + 1}: non-finite loss or gradient, step skipped (nan_policy=skip)")
    else:
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        parts.optimizer.zero_grad(set_to_none=True)
    parts.scheduler.step()
    state.step += 1
    if loop.watchdog is not None:
        loop.watchdog.step_done(state.step)
    return grad_norm


def after_step(loop: Loop, state: TrainState, outcome: StepOutcome) -> bool:
    """Everything between two steps: log, report, evaluate, checkpoint; True = SIGTERM, stop now."""
    step = state.step
    loop.phase("logging")
    loop.step_times.append(outcome.seconds)
    _write_metrics(loop, state, outcome)
    _report_progress(loop, state, outcome)
    if loop.hooks.evaluate.due(step):
        with loop.watchdog.paused("evaluation") if loop.watchdog is not None else nullcontext():
            scores = loop.hooks.evaluate(loop.parts.model, loop.wrapped, loop.tasks, step)
        if scores:
            state.evals[step] = scores
    loop.phase("agreeing on SIGTERM")
    if loop.hooks.sigterm is not None and any_flag(loop.hooks.sigterm.raised, loop.env):
        path = save_checkpoint(loop, state)
        loop.hooks.say(f"SIGTERM: saved {path} at step {step}; resume with --resume auto")
        return True
    every = loop.recipe.train.ckpt_every
    if every > 0 and step % every == 0 and step < loop.total:
        save_checkpoint(loop, state)
    return False


def save_checkpoint(loop: Loop, state: TrainState) -> Path:
    """The TrainState and the trainables as the step folder of `state.step` (every rank calls it).

    `loop.last_checkpoint` names only published folders: an asynchronous save stays pending (and
    the one it publishes, the previous pending save, becomes the last checkpoint)."""
    rec = loop.recipe
    loop.phase("checkpoint")
    previous = loop.parts.pending.final if loop.parts.pending is not None else None
    path = ckpt.save_training_checkpoint(loop.run_dir / runs.CKPT_DIR, state, loop.parts, loop.env,
                                         keep=rec.train.keep_checkpoints, meta={"recipe": rec.name, "stage": rec.stage})
    if loop.parts.pending is None:
        loop.last_checkpoint = path
    elif previous is not None:
        loop.last_checkpoint = previous
    if loop.env.is_main:
        runs.plot_curves(loop.run_dir)
    return path


def publish_pending(loop: Loop) -> None:
    """Publish an asynchronous save still in writing (every rank calls it); it becomes the last checkpoint."""
    path = ckpt.finish_pending(loop.parts, loop.env)
    if path is not None:
        loop.last_checkpoint = path


def newest_checkpoint(loop: Loop) -> Path | None:
    """The newest step folder saved: the pending one of an asynchronous save, else the last published."""
    return loop.parts.pending.final if loop.parts.pending is not None else loop.last_checkpoint


# -- the pieces of after_step -----------------------------------------------------------------------


def _write_metrics(loop: Loop, state: TrainState, outcome: StepOutcome) -> None:
    """Every `log_every` steps (and at the end): the window's rows on rank 0, a new window everywhere."""
    step = state.step
    if step % loop.recipe.train.log_every != 0 and step != loop.total:
        return
    now = time.perf_counter()
    if loop.metrics is not None:
        head = {"lr": outcome.lr, "samples_per_s": state.window.samples / max(now - loop.window_start, 1e-9)}
        for task, values in window_rows(state.window, head, outcome.grad_norm):
            loop.metrics.write(step, "train", task, values, now - loop.began)
    state.window.clear()
    loop.window_start = time.perf_counter()


def window_rows(window: LogWindow, head: dict[str, float], grad_norm: float | None) -> list[tuple[str, dict[str, float]]]:
    """Metrics rows of a logging window: ("", lr / speed / mean loss / grad norm), then per task
    (sorted) its mean loss and the mean of every numeric statistic it reported."""
    by_task: dict[str, list[tuple[float, dict[str, float]]]] = {}
    for name, value, stats in window.rows:
        by_task.setdefault(name, []).append((value, stats))
    overall = dict(head)
    finite_all = [v for _, v, _ in window.rows if math.isfinite(v)]
    if finite_all:
        overall["loss"] = float(np.mean(finite_all))
    if grad_norm is not None:
        overall["grad_norm"] = grad_norm
    out = [("", overall)]
    for name, rows in sorted(by_task.items()):
        vals = [v for v, _ in rows if math.isfinite(v)]
        row: dict[str, float] = {"loss": float(np.mean(vals))} if vals else {}
        for k in sorted({k for _, s in rows for k in s}):
            xs = [float(s[k]) for _, s in rows if k in s and isinstance(s[k], (int, float))]
            if xs:
                row[k] = float(np.mean(xs))
        if row:
            out.append((name, row))
    return out


def _report_progress(loop: Loop, state: TrainState, outcome: StepOutcome) -> None:
    if loop.hooks.progress is None:
        return
    per = sum(loop.step_times) / len(loop.step_times)
    samples = sum(m.samples for m in outcome.micros)
    loop.hooks.progress(StepReport(state.step, loop.total, outcome.mean_loss, outcome.lr,
                                   samples / max(outcome.seconds, 1e-9), per * (loop.total - state.step),
                                   outcome.tasks, outcome.grad_norm))


def _next_nonempty(loader: MultiTaskLoader) -> LoadedBatch:
    """The next draw with at least one loadable sample (empty draws are counted by the loader)."""
    while True:
        item = next(loader)
        if item.batch is not None:
            return item


def _to_device(value: Any, device: torch.device) -> Any:
    """Tensors of a batch (nested in dicts / lists / tuples) to the GPU; pinned ones asynchronously."""
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=value.is_pinned())
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _publish_before_stopping(loop: Loop) -> None:
    """An asynchronous save still in writing holds the state of an earlier, finite step: publish it
    before stopping on a non-finite loss, so the last good checkpoint is the same as with synchronous
    saves. Every rank gets here together (the non-finite flag is agreed), as publishing needs. A
    failed write is one warning; the checkpoint before it stays the last good one."""
    try:
        publish_pending(loop)
    except CheckpointError as exc:
        loop.hooks.say(f"warning: {exc}")


def _diverged(step: int, bad: tuple[str, list[str], float] | None, env: DistEnv, last: Path | None) -> TrainingDiverged:
    keep = f"the last good checkpoint is {last}" if last is not None else "no checkpoint was written yet"
    if bad is None:
        return TrainingDiverged(f"step {step}: another rank got a non-finite loss (this is rank {env.rank}); {keep}")
    task, ids, value = bad
    shown = ", ".join(ids[:8]) + (f" ... ({len(ids)} samples)" if len(ids) > 8 else "")
    what = "gradient norm" if not ids else "loss"
    where = f" on samples [{shown}]" if ids else ""
    return TrainingDiverged(
        f"step {step}: task {task!r} gave a non-finite {what} ({value}){where}; {keep}; lower optim.lr, "
        "check the data, or set train.nan_policy=skip"
    )


__all__ = [
    "Hooks", "Loop", "MicroOutcome", "SigtermFlag", "StepModule", "StepOutcome", "StepReport", "TrainingDiverged",
    "after_step", "micro_step", "newest_checkpoint", "optimizer_step", "publish_pending", "run_loop", "save_checkpoint",
    "train_step", "window_rows",
]
