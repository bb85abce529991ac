"""One trainer for pre-training, prompt tuning and fine-tuning: `train(recipe, ...) -> TrainResult`.

Per optimizer step, for each of `grad_accum` micro-steps: the sampler picks this rank's task, the
loader hands over that task's next batch, the task's target set is encoded WITH gradients, and
`task.loss` gives the loss, weighted by the task's loss_weight. Then gradients are clipped and
AdamW and the schedule step. Stages differ only in which parameters train (`tuning.py`), the data
(few-shot fractions) and hyper-parameters: all of that comes from the recipe.

This module builds a stage (model, data, optimizer, the TrainState, resumed or fresh) and hands
it to the loop of named steps in `steps.py`; periodic evaluation is `periodic_eval.py`; what
survives a restart is `train_state.TrainState`, saved whole by `train_checkpoint.py`.

Guarantees:
- exact resume: model, optimizer, schedule and the TrainState (step, data cursors, python / numpy /
  torch RNG states, loss scale, logging window) are restored, so on CPU a resumed run reproduces
  the uninterrupted losses;
- a non-finite loss (or gradient norm) stops with an error naming step, task and sample ids
  (nan_policy "stop", the last good checkpoint stays on disk), or skips that step ("skip");
- SIGTERM saves a checkpoint and returns `TrainResult(interrupted=True)` (the CLI exits 143);
- a rank with no finished step within `train.step_timeout_s` names its phase, what it reads and
  its stack, and ends the job (`watchdog.py`); a dead peer is one `PeerLost` line on every rank;
- library code reports through callbacks only (`progress`, `log`), on rank 0 only: other ranks
  log to the `uniperceiver.engine` logger, so a job of N processes prints one story.
"""

from __future__ import annotations

import logging
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from uniperceiver.config.schema import Recipe
from uniperceiver.engine import runs
from uniperceiver.engine import train_checkpoint as ckpt
from uniperceiver.engine.distributed import (
    DistEnv, barrier, init_distributed, is_fsdp, peer_failure, shutdown_distributed, wrap_model,
)
from uniperceiver.engine.loader import MultiTaskLoader
from uniperceiver.engine.optim import build_optimizer, build_scheduler
from uniperceiver.engine.periodic_eval import EvalHook, PeriodicEval, harness_hook
from uniperceiver.engine.run_setup import (build_training_model, build_training_tasks, preflight, prepare_run_dir,
                                           set_checkpoints_aside)
from uniperceiver.engine.steps import (  # StepReport, TrainingDiverged: re-exported
    Hooks, Loop, SigtermFlag, StepModule, StepReport, TrainingDiverged, newest_checkpoint, publish_pending, run_loop,
    save_checkpoint,
)
from uniperceiver.engine.targets import TargetSets
from uniperceiver.engine.train_state import TrainState
from uniperceiver.engine.tuning import TuningInfo, setup_tuning
from uniperceiver.engine.watchdog import PeerBoard, StepWatchdog, WatchdogSpec
from uniperceiver.errors import CheckpointError, ConfigError
from uniperceiver.modeling.model import UniPerceiver
from uniperceiver.tasks.base import Task

logger = logging.getLogger("uniperceiver.engine")

Log = Callable[[str], None]


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path | None
    step: int
    max_steps: int
    interrupted: bool = False
    resumed_from: Path | None = None
    #: (step, task, loss) of every micro-step this process trained (not those before a resume).
    history: list[tuple[int, str, float]] = field(default_factory=list, repr=False)
    skipped_steps: int = 0
    skipped_media: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Draws read again because a loader worker died (the OOM killer), over the whole run.
    loader_restarts: int = 0
    tuning: TuningInfo | None = None
    seconds: float = 0.0
    last_checkpoint: Path | None = None
    #: Periodic-evaluation scores by step (those before a resume included).
    evals: dict[int, dict[str, float]] = field(default_factory=dict)
    #: The trained model itself (this rank's copy), for callers that go on using it.
    model: UniPerceiver | None = field(default=None, repr=False)


@dataclass
class RunRequest:
    """Where a run goes and how long it trains (`train`'s keywords; see its docstring)."""

    output: str | Path | None = None
    runs_root: str | Path | None = None
    resume: str | Path | None = None
    data_dir: str | Path | None = None
    max_steps: int | None = None
    device: str | None = None


@dataclass
class Callbacks:
    """How a run talks to its caller: per-step progress, log lines, an evaluation hook, signals."""

    progress: Callable[[StepReport], None] | None = None
    log: Log = logger.info
    evaluate: EvalHook | None = None
    handle_sigterm: bool = True

    def for_rank(self, env: DistEnv) -> "Callbacks":
        """Rank 0 keeps the caller's callbacks; other ranks report no progress and log to `logger`."""
        if env.is_main:
            return self

        def log(message: str) -> None:
            logger.info("rank %d: %s", env.rank, message)

        return replace(self, progress=None, log=log)


@dataclass
class _Context:
    env: DistEnv
    request: RunRequest
    calls: Callbacks


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """None = fp32. "auto": bf16 on CUDA with bf16 support, fp16 on older GPUs, fp32 on CPU."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("train.precision=bf16: this GPU does not support bfloat16; use fp16 or auto")
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError("train.precision=fp16 needs a GPU (loss scaling); on CPU use bf16 or fp32")
        return torch.float16
    raise ConfigError(f"train.precision={precision!r}; expected auto, fp32, bf16 or fp16")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def train(
    recipe: Recipe,
    *,
    output: str | Path | None = None,
    runs_root: str | Path | None = None,
    resume: str | Path | None = None,
    data_dir: str | Path | None = None,
    max_steps: int | None = None,
    progress: Callable[[StepReport], None] | None = None,
    log: Log | None = None,
    evaluate: EvalHook | None = None,
    device: str | None = None,
    handle_sigterm: bool = True,
) -> TrainResult:
    """Train `recipe` (every stage in order when it has `stages`); see the module docstring.

    output: the run folder (default: a new `runs/<stage>-<task>-<time>/` under runs_root).
    resume: None, "auto" (newest valid checkpoint of `output`, or of the newest run of the same
    recipe) or a path (a step folder, a checkpoints folder or a run folder).
    progress / log: called on rank 0 only (default log: the `uniperceiver.engine` logger).
    evaluate: the periodic evaluation every `train.eval_every` steps, hook(model, tasks, step) ->
    {"task/metric": value}; default `periodic_eval.harness_hook(recipe.eval, recipe.train.num_workers)`.
    """
    request = RunRequest(output, runs_root, resume, data_dir, max_steps, device)
    calls = Callbacks(progress, log or logger.info, evaluate, handle_sigterm)
    stages = _expanded_stages(recipe, data_dir)
    env = init_distributed(device, timeout_s=recipe.train.collective_timeout_s)
    try:
        ctx = _Context(env, request, calls.for_rank(env))
        if not stages:
            run_dir, start = prepare_run_dir(recipe, output, runs_root, resume, env, ctx.calls.log)
            return _train_stage(recipe, run_dir, start, ctx)
        return _train_stages(recipe, stages, ctx)
    except RuntimeError as exc:
        lost = peer_failure(exc, env)
        if lost is None:
            raise
        raise lost from None
    finally:
        shutdown_distributed(env)


def _expanded_stages(recipe: Recipe, data_dir: str | Path | None) -> list[tuple[str, Recipe]]:
    """The stage recipes of a multi-stage recipe ([] for a plain one), each checked by `preflight`."""
    if not recipe.stages:
        preflight(recipe, data_dir)
        return []
    from uniperceiver.config import expand_stages

    expanded = expand_stages(recipe)
    for i, (_, sub) in enumerate(expanded):
        if i > 0:
            sub.model.checkpoint = None  # comes from the previous stage
        preflight(sub, data_dir)
    return expanded


def _train_stages(recipe: Recipe, stages: list[tuple[str, Recipe]], ctx: _Context) -> TrainResult:
    """Each stage in its own `stage-<i>-<name>/` folder, starting from the previous one's final weights."""
    req, say = ctx.request, ctx.calls.log
    run_dir, _ = prepare_run_dir(recipe, req.output, req.runs_root, req.resume, ctx.env, say, want_checkpoint=False)
    previous: Path | None = None
    result: TrainResult | None = None
    for i, (name, sub) in enumerate(stages):
        if previous is not None:
            sub.model.checkpoint = str(previous)
        sub_dir = run_dir / f"stage-{i + 1}-{name}"
        final = sub_dir / runs.FINAL_NAME
        if req.resume not in (None, "never") and (final / "model.safetensors").is_file():
            say(f"stage {i + 1} ({name}) already finished: {final}")
            previous = final
            continue
        if req.resume is not None and str(req.resume) == "never":
            set_checkpoints_aside(sub_dir, say)
        sub_dir.mkdir(parents=True, exist_ok=True)
        start = (ckpt.find_valid_checkpoint(sub_dir / runs.CKPT_DIR, warn=say, refuse_all_damaged=True)
                 if req.resume not in (None, "never") else None)
        say(f"stage {i + 1}/{len(stages)} ({name}) -> {sub_dir}")
        result = _train_stage(sub, sub_dir, start, ctx)
        result.run_dir = run_dir
        if result.interrupted:
            return result
        previous = result.final_dir
    return result if result is not None else TrainResult(run_dir=run_dir, final_dir=previous, step=0, max_steps=0)


def _train_stage(recipe: Recipe, run_dir: Path, start: Path | None, ctx: _Context) -> TrainResult:
    """Build one stage, run its loop, write its final weights."""
    loop, state, tuning = _build_loop(recipe, run_dir, start, ctx)
    try:
        with SigtermFlag() if ctx.calls.handle_sigterm else nullcontext() as sig:
            loop.hooks.sigterm = sig
            with _watchdog(loop) as dog:
                loop.watchdog = dog
                interrupted = run_loop(loop, state)
            loop.watchdog = None
            final_model, final_dir = _finish(loop, state, interrupted)
    finally:
        ckpt.abandon_pending(loop.parts)  # only after an error: _finish published the last one
        loop.parts.loader.close()
        if loop.metrics is not None:
            loop.metrics.close()
            runs.plot_curves(run_dir)
    return TrainResult(
        run_dir=run_dir, final_dir=final_dir, step=state.step, max_steps=loop.total, interrupted=interrupted,
        resumed_from=start, history=loop.history, skipped_steps=state.skipped_steps,
        skipped_media={k: dict(v) for k, v in loop.parts.loader.skipped.items()},
        loader_restarts=loop.parts.loader.worker_restarts, tuning=tuning,
        seconds=time.perf_counter() - loop.began, last_checkpoint=loop.last_checkpoint, evals=dict(state.evals),
        model=final_model,
    )


def _watchdog(loop: Loop) -> StepWatchdog:
    """This rank's step watchdog (see watchdog.py), started by `with`."""
    env, loader = loop.env, loop.parts.loader

    def resumable() -> str:
        last = loop.last_checkpoint
        return (f"the last good checkpoint {last} stays resumable (--resume auto)" if last is not None
                else "no checkpoint was written yet")

    spec = WatchdogSpec(env.rank, env.world_size, loop.recipe.train.step_timeout_s, loop.run_dir,
                        loading=loader.reading_now, worker_pids=loader.worker_pids, resumable=resumable)
    return StepWatchdog(spec, PeerBoard.connect(env.rank, env.world_size))


def _finish(loop: Loop, state: TrainState, interrupted: bool) -> tuple[UniPerceiver, Path | None]:
    """A plain model with the full weights (FSDP: a collective) and, unless interrupted, the last
    checkpoint and final/ (the weights later stages and evaluation load)."""
    final_model = ckpt.unsharded_copy(loop.parts.model) if is_fsdp(loop.wrapped) else loop.parts.model
    if interrupted:
        publish_pending(loop)  # the SIGTERM checkpoint is published before we stop
        return final_model, None
    newest = newest_checkpoint(loop)
    if newest is None or ckpt.step_dir_name(state.step) != Path(newest).name:
        save_checkpoint(loop, state)
    publish_pending(loop)  # an asynchronous save is published before final/
    final_dir = loop.run_dir / runs.FINAL_NAME
    if loop.env.is_main:
        from uniperceiver.modeling.model_dir import save_model

        rec = loop.recipe
        save_model(final_model, final_dir, extra={"recipe": rec.name, "stage": rec.stage, "step": state.step})
    barrier(loop.env)
    return final_model, final_dir


# -- building a stage ---------------------------------------------------------------------------------


def _build_loop(recipe: Recipe, run_dir: Path, start: Path | None, ctx: _Context) -> tuple[Loop, TrainState, TuningInfo]:
    """Everything the loop needs, in an order that keeps runs reproducible: the model is built
    right after seeding (identical on every rank), then every rank reseeds with its own seed, and a
    resumed state's RNG is put back last."""
    began = time.perf_counter()
    env, tr, say = ctx.env, recipe.train, ctx.calls.log
    total = int(ctx.request.max_steps if ctx.request.max_steps is not None else tr.max_steps)
    if total <= 0:
        raise ConfigError(f"--max-steps must be positive, got {total}")
    amp_dtype = resolve_precision(tr.precision, env.device)
    seed_everything(tr.seed)  # identical initialisation on every rank
    model = build_training_model(recipe)
    tuning = setup_tuning(model, recipe.tune.mode)
    model.to(env.device)
    tasks, loader = _build_data(recipe, model, ctx)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)
    seed_everything(tr.seed + env.rank)
    # The weights go in before wrapping (FSDP shards what the model holds), except a format v3
    # checkpoint under FSDP: then each rank reads only its own shards, after wrapping.
    sharded_read = start is not None and tr.sharding == "fsdp" and env.distributed and ckpt.has_dcp_weights(start)
    saved = _read_start(start, model, env, weights=not sharded_read)
    wrapped = wrap_model(StepModule(model), env, tr.sharding, amp_dtype)
    if sharded_read:
        _read_weights(lambda: ckpt.read_sharded_weights_into(model, start, env))
    # Built after wrapping: FSDP replaces the parameters by sharded ones (DDP keeps them).
    optimizer = build_optimizer(model, recipe.optim)
    parts = ckpt.Trainables(model, optimizer, build_scheduler(optimizer, recipe.optim, total), scaler, loader)
    state = _resume(saved, parts, run_dir, ctx) if saved is not None else TrainState(world_size=env.world_size)
    precision = "fp32" if amp_dtype is None else str(amp_dtype).replace("torch.", "")
    ranks = f" x {env.world_size} ranks ({'fsdp' if is_fsdp(wrapped) else 'ddp'})" if env.distributed else ""
    say(f"{recipe.stage} {', '.join(t.cfg.name for t in tasks)}: {total} steps, {tuning.describe()}, "
        f"{precision} on {env.device}{ranks} -> {run_dir}")
    metrics = _open_metrics(recipe, run_dir, total, fresh=start is None, env=env, resumed_at=state.step)
    hooks = Hooks(ctx.calls.progress, say, _periodic_eval(recipe, ctx.calls, metrics, began))
    model.train()
    loop = Loop(recipe=recipe, env=env, parts=parts, wrapped=wrapped, tasks=tasks, targets=TargetSets(tasks, tr.seed),
                amp_dtype=amp_dtype, total=total, run_dir=run_dir, hooks=hooks, metrics=metrics,
                began=began, trainable=[p for p in model.parameters() if p.requires_grad],
                last_checkpoint=start)
    return loop, state, tuning


def _build_data(recipe: Recipe, model: UniPerceiver, ctx: _Context) -> tuple[list[Task], MultiTaskLoader]:
    """The tasks (their prepared datasets opened) and the loader of this rank's batches."""
    env, tr = ctx.env, recipe.train
    tasks, examples = build_training_tasks(recipe, model.cfg, ctx.request.data_dir, env)
    if tr.compile:
        model.encoder.compile()
    loader = MultiTaskLoader(
        tasks, examples,
        weights=[t.cfg.sample_weight for t in tasks], batch_sizes=[t.cfg.batch_size for t in tasks],
        seed=tr.seed, rank=env.rank, world_size=env.world_size, num_workers=tr.num_workers,
        pin_memory=env.device.type == "cuda" and tr.num_workers > 0, say=ctx.calls.log,
    )
    return tasks, loader


def _read_start(start: Path | None, model: UniPerceiver, env: DistEnv, weights: bool = True
                ) -> ckpt.TrainingCheckpoint | None:
    """The checkpoint to resume (None for a fresh start), its weights already read into `model`
    (unless `weights` is False: the caller reads them itself, sharded).

    `start` was verified when it was chosen (`find_valid_checkpoint` / `resolve_checkpoint_path`),
    so its files are not hashed again; the weights go straight into the parameters (no second copy).
    Every saved rank's cursors are read when this run's world size differs (see `TrainState.restore`).
    """
    if start is None:
        return None
    saved = ckpt.load_checkpoint(start, env.rank, world_size=env.world_size, verified=True)
    if weights:
        _read_weights(lambda: ckpt.read_weights_into(model, start))
    return saved


def _read_weights(read: Callable[[], None]) -> None:
    """Run `read`; a checkpoint of another shape is one line that says so."""
    try:
        read()
    except CheckpointError as exc:
        raise CheckpointError(f"cannot resume: the checkpoint does not fit this recipe's model ({exc})") from None


def _resume(saved: ckpt.TrainingCheckpoint, parts: ckpt.Trainables, run_dir: Path, ctx: _Context) -> TrainState:
    """Optimizer and schedule state in, then the TrainState back into the loader, scaler and RNG."""
    ckpt.restore_optimizer(saved, parts.model, parts.optimizer, ctx.env)
    parts.scheduler.load_state_dict(saved.scheduler)
    state = saved.state
    state.restore(parts.loader, parts.scaler, ctx.calls.log)
    if ctx.env.is_main:
        runs.truncate_metrics(run_dir, state.step)  # rows logged after the checkpoint are redone
    ctx.calls.log(f"resumed from {saved.path} at step {state.step}")
    return state


def _open_metrics(recipe: Recipe, run_dir: Path, total: int, *, fresh: bool, env: DistEnv,
                  resumed_at: int = 0) -> runs.MetricsLog | None:
    """Rank 0's metrics log (None elsewhere); a fresh start in a reused folder drops stale rows.

    TensorBoard drops its events from the first step a run trains again (`purge_step`; a fresh start:
    all of them), as the CSV drops its rows (`truncate_metrics`): redone steps appear once in the curves."""
    if not env.is_main:
        return None
    if fresh:
        runs.truncate_metrics(run_dir, 0)
    runs.write_run_info(run_dir, {"stage": recipe.stage, "recipe": recipe.name, "tasks": [t.name for t in recipe.tasks],
                                  "max_steps": total, "world_size": env.world_size})
    return runs.MetricsLog(run_dir, purge_step=0 if fresh else resumed_at + 1)


def _periodic_eval(recipe: Recipe, calls: Callbacks, metrics: runs.MetricsLog | None, began: float) -> PeriodicEval:
    """The caller's evaluation hook, else the harness on every task, every `train.eval_every` steps."""
    hook = calls.evaluate if calls.evaluate is not None else harness_hook(recipe.eval, recipe.train.num_workers)
    return PeriodicEval(recipe.train.eval_every, hook, metrics, calls.log, began)


__all__ = [
    "Callbacks", "EvalHook", "RunRequest", "StepReport", "TrainResult", "TrainingDiverged", "resolve_precision",
    "seed_everything", "train",
]
