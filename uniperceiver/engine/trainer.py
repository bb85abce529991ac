"""One training loop for pre-training, prompt tuning and fine-tuning.

Per optimizer step, for each of `grad_accum` micro-steps: the sampler picks this rank's task, the
loader hands over that task's next batch, the task's target set is encoded WITH gradients, and
`task.loss` gives the loss, weighted by the task's loss_weight. Then gradients are clipped and
AdamW and the schedule step. Stages differ only in which parameters train (`tuning.py`), the data
(few-shot fractions) and hyper-parameters: all of that comes from the recipe.

Guarantees:
- exact resume: model, optimizer, schedule, data cursors, python / numpy / torch RNG states and
  the step are restored, so on CPU a resumed run reproduces the uninterrupted losses;
- a non-finite loss (or gradient norm) stops with an error naming step, task and sample ids
  (nan_policy "stop", the last good checkpoint stays on disk), or skips that step ("skip");
- SIGTERM saves a checkpoint and returns `TrainResult(interrupted=True)` (the CLI exits 143);
- library code reports through callbacks only (`progress`, `log`): no terminal I/O of its own.
"""

from __future__ import annotations

import logging
import math
import random
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from uniperceiver.engine import train_checkpoint as ckpt
from uniperceiver.engine import runs
from uniperceiver.engine.distributed import (
    DistEnv, any_flag, barrier, clip_gradients, finish_grads, full_params, init_distributed, is_fsdp,
    shutdown_distributed, skip_grad_sync, wrap_model,
)
from uniperceiver.engine.loader import LoadedBatch, MultiTaskLoader
from uniperceiver.engine.optim import build_optimizer, build_scheduler
from uniperceiver.engine.run_setup import build_training_model, build_training_tasks, preflight, prepare_run_dir
from uniperceiver.engine.targets import StepTargets, TargetSets
from uniperceiver.engine.tuning import TuningInfo, setup_tuning
from uniperceiver.errors import CheckpointError, ConfigError, UpctlError
from uniperceiver.modeling.model import UniPerceiver
from uniperceiver.tasks.base import Task

logger = logging.getLogger("uniperceiver.engine")

Log = Callable[[str], None]
EvalHook = Callable[[UniPerceiver, Sequence[Task], int], dict[str, float]]


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
    tuning: TuningInfo | None = None
    seconds: float = 0.0
    last_checkpoint: Path | None = None
    #: The trained model itself (this rank's copy), for callers that go on using it.
    model: UniPerceiver | None = field(default=None, repr=False)


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


class _StepModule(nn.Module):
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class _SigtermFlag:
    """SIGTERM sets a flag checked after each step (only installable in the main thread)."""

    def __init__(self) -> None:
        self.raised = False
        self._old: Any = None

    def __enter__(self) -> "_SigtermFlag":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def train(
    recipe: Any,
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
    """
    say = log or logger.info
    stages = list(getattr(recipe, "stages", None) or [])
    if not stages:
        preflight(recipe, data_dir)
    else:
        from uniperceiver.config import expand_stages

        expanded = expand_stages(recipe)
        for i, (_, sub) in enumerate(expanded):
            if i > 0:
                sub.model.checkpoint = None  # comes from the previous stage
            preflight(sub, data_dir)
    env = init_distributed(device)
    try:
        if not stages:
            run_dir, start = prepare_run_dir(recipe, output, runs_root, resume, env, say)
            return _train_one(recipe, run_dir, start, env, data_dir, max_steps, progress, say, evaluate, handle_sigterm)
        run_dir, _ = prepare_run_dir(recipe, output, runs_root, resume, env, say, want_checkpoint=False)
        previous: Path | None = None
        result: TrainResult | None = None
        for i, (name, sub) in enumerate(expanded):
            if previous is not None:
                sub.model.checkpoint = str(previous)
            sub_dir = run_dir / f"stage-{i + 1}-{name}"
            final = sub_dir / runs.FINAL_NAME
            if resume is not None and (final / "model.safetensors").is_file():
                say(f"stage {i + 1} ({name}) already finished: {final}")
                previous = final
                continue
            sub_dir.mkdir(parents=True, exist_ok=True)
            start = None
            if resume is not None:
                start = ckpt.find_valid_checkpoint(sub_dir / runs.CKPT_DIR, warn=say)
            say(f"stage {i + 1}/{len(expanded)} ({name}) -> {sub_dir}")
            result = _train_one(sub, sub_dir, start, env, data_dir, max_steps, progress, say, evaluate, handle_sigterm)
            if result.interrupted:
                result.run_dir = run_dir
                return result
            previous = result.final_dir
        if result is None:  # every stage had finished before
            return TrainResult(run_dir=run_dir, final_dir=previous, step=0, max_steps=0)
        result.run_dir = run_dir
        return result
    finally:
        shutdown_distributed(env)


def _train_one(
    recipe: Any,
    run_dir: Path,
    start: Path | None,
    env: DistEnv,
    data_dir: str | Path | None,
    max_steps: int | None,
    progress: Callable[[StepReport], None] | None,
    say: Log,
    evaluate: EvalHook | None,
    handle_sigterm: bool,
) -> TrainResult:
    began = time.perf_counter()
    tr = recipe.train
    total = int(max_steps if max_steps is not None else tr.max_steps)
    if total <= 0:
        raise ConfigError(f"--max-steps must be positive, got {total}")
    seed = int(tr.seed)
    amp_dtype = resolve_precision(str(tr.precision), env.device)

    seed_everything(seed)  # identical initialisation on every rank
    model = build_training_model(recipe)
    tuning = setup_tuning(model, str(recipe.tune.mode))
    model.to(env.device)
    tasks, examples = build_training_tasks(recipe, model.cfg, data_dir, env)
    if getattr(tr, "compile", False):
        model.encoder.compile()
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)
    loader = MultiTaskLoader(
        tasks, examples,
        weights=[t.cfg.sample_weight for t in tasks], batch_sizes=[t.cfg.batch_size for t in tasks],
        seed=seed, rank=env.rank, world_size=env.world_size, num_workers=int(tr.num_workers),
        pin_memory=env.device.type == "cuda" and int(tr.num_workers) > 0,
    )
    targets = TargetSets(tasks, seed)
    names = [t.cfg.name for t in tasks]
    step = 0
    skipped_steps = 0
    restored_window: list[tuple[str, float, dict[str, float]]] = []
    restored_samples = 0
    seed_everything(seed + env.rank)
    state = ckpt.load_checkpoint(start, env.rank) if start is not None else None
    if state is not None:  # the weights go in before wrapping: FSDP shards what the model holds
        try:
            ckpt.load_weights_into(model, {k: v.to(env.device) for k, v in state.model_state.items()}, str(start))
        except CheckpointError as exc:
            raise CheckpointError(f"cannot resume: the checkpoint does not fit this recipe's model ({exc})") from None
    step_module = _StepModule(model)
    ddp = wrap_model(step_module, env, str(getattr(tr, "sharding", "ddp")), amp_dtype)
    # Built after wrapping: FSDP replaces the parameters by sharded ones (DDP keeps them).
    optimizer = build_optimizer(model, recipe.optim)
    scheduler = build_scheduler(optimizer, recipe.optim, total)
    if state is not None:
        ckpt.load_optimizer_state(model, optimizer, state.optimizer, str(start))
        scheduler.load_state_dict(state.scheduler)
        if state.scaler is not None:
            scaler.load_state_dict(state.scaler)
        step = int(state.trainer["step"])
        skipped_steps = int(state.trainer.get("skipped_steps", 0))
        restored_window = [(str(n), float(v), dict(st)) for n, v, st in state.trainer.get("log_window", [])]
        restored_samples = int(state.trainer.get("log_window_samples", 0))
        if state.rank_state is not None:
            fresh = loader.load_state_dict(state.rank_state["data"])
            if fresh:
                say(f"checkpoint has no data cursor for task(s) {', '.join(fresh)}: they start from the beginning")
            ckpt.restore_rng_state(state.rank_state["rng"])
        else:
            say(f"checkpoint {start} has no state for rank {env.rank} (another world size): data cursors restart")
        if env.is_main:
            runs.truncate_metrics(run_dir, step)
        say(f"resumed from {start} at step {step}")
    say(f"{recipe.stage} {', '.join(names)}: {total} steps, {tuning.describe()}, "
        f"{'fp32' if amp_dtype is None else str(amp_dtype).replace('torch.', '')} on {env.device}"
        + (f" x {env.world_size} ranks ({'fsdp' if is_fsdp(ddp) else 'ddp'})" if env.distributed else "") + f" -> {run_dir}")
    if env.is_main and start is None:
        runs.truncate_metrics(run_dir, 0)  # a fresh start in a reused folder: no stale rows
    if env.is_main:
        runs.write_run_info(run_dir, {"stage": recipe.stage, "recipe": recipe.name, "tasks": names,
                                      "max_steps": total, "world_size": env.world_size})
    metrics = runs.MetricsLog(run_dir) if env.is_main else None
    model.train()
    result = TrainResult(run_dir=run_dir, final_dir=None, step=step, max_steps=total, resumed_from=start,
                         tuning=tuning, skipped_steps=skipped_steps, last_checkpoint=start, model=model)
    accum = int(tr.grad_accum)
    params = [p for p in model.parameters() if p.requires_grad]
    clip = float(recipe.optim.clip_grad or 0.0)
    # The logging window (steps since the last metrics row) is part of the checkpoint, so a run
    # resumed between two log rows writes the same rows as an uninterrupted one.
    window: list[tuple[str, float, dict[str, float]]] = list(restored_window)
    window_samples = restored_samples
    window_start = time.perf_counter()
    step_times: list[float] = []
    ckpt_root = run_dir / runs.CKPT_DIR

    def save(at: int) -> Path:
        extra = {"log_window": [(n, v, dict(st)) for n, v, st in window], "log_window_samples": window_samples}
        path = ckpt.save_training_checkpoint(ckpt_root, at, model, optimizer, scheduler, scaler, loader, skipped_steps,
                                             int(tr.keep_checkpoints), env, recipe, extra)
        result.last_checkpoint = path
        if env.is_main:
            runs.plot_curves(run_dir)
        return path

    try:
        with (_SigtermFlag() if handle_sigterm else nullcontext()) as sig:
            while step < total:
                t0 = time.perf_counter()
                lr = scheduler.current_lr()
                bad: tuple[str, list[str], float] | None = None
                step_tasks: list[str] = []
                losses: list[float] = []
                step_samples = 0
                for micro in range(accum):
                    item = _next_nonempty(loader)
                    if env.device.type == "cuda":
                        item.batch = _to_device(item.batch, env.device)
                    task = tasks[item.spec.task]
                    name = names[item.spec.task]
                    plan = targets.plan(item.spec.task, step, micro, env)
                    sync = env.distributed and micro < accum - 1
                    with skip_grad_sync(ddp, sync):
                        with torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                            loss, stats = ddp(task, item.batch, plan)
                        value = float(loss.detach().float().item())
                        finite = math.isfinite(value)
                        if not finite and bad is None:
                            bad = (name, item.ids, value)
                        weighted = loss.float() * float(task.cfg.loss_weight) / accum
                        if finite or env.distributed:  # DDP needs every backward it started
                            scaler.scale(weighted).backward()
                    window_samples += item.size
                    step_samples += item.size
                    step_tasks.append(name)
                    losses.append(value)
                    result.history.append((step + 1, name, value))
                    window.append((name, value, dict(stats)))
                finish_grads(ddp, env)
                any_bad = any_flag(bad is not None, env)
                grad_norm: float | None = None
                if not any_bad:
                    scaler.unscale_(optimizer)
                    norm = clip_gradients(params, clip if clip > 0 else float("inf"))
                    grad_norm = float(norm)
                    if not math.isfinite(grad_norm) and not scaler.is_enabled():
                        bad = (",".join(dict.fromkeys(step_tasks)), [], grad_norm)
                        any_bad = True
                if any_bad:
                    if str(tr.nan_policy) == "stop":
                        raise _diverged(step + 1, bad, env, result.last_checkpoint)
                    skipped_steps += 1
                    result.skipped_steps = skipped_steps
                    optimizer.zero_grad(set_to_none=True)  # (the fp16 scaler keeps its scale)
                    say(f"step {step + 1}: non-finite loss or gradient, step skipped (nan_policy=skip)")
                else:
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                result.step = step
                step_times.append(time.perf_counter() - t0)
                mean_loss = float(np.mean([v for v in losses if math.isfinite(v)])) if any(map(math.isfinite, losses)) else float("nan")
                if metrics is not None and (step % int(tr.log_every) == 0 or step == total):
                    elapsed = time.perf_counter() - window_start
                    _log_window(metrics, step, window, lr, grad_norm, window_samples / max(elapsed, 1e-9),
                                time.perf_counter() - began)
                    window, window_samples, window_start = [], 0, time.perf_counter()
                if progress is not None and env.is_main:
                    recent = step_times[-20:]
                    per = sum(recent) / len(recent)
                    progress(StepReport(step, total, mean_loss, lr, step_samples / max(step_times[-1], 1e-9),
                                        per * (total - step), "+".join(dict.fromkeys(step_tasks)), grad_norm))
                if evaluate is not None and int(tr.eval_every) > 0 and step % int(tr.eval_every) == 0:
                    with full_params(ddp):
                        scores = evaluate(model, tasks, step)
                    model.train()
                    if metrics is not None and scores:
                        metrics.write(step, "eval", "", scores, time.perf_counter() - began)
                stop = any_flag(sig is not None and sig.raised, env) if handle_sigterm else False
                if stop:
                    path = save(step)
                    say(f"SIGTERM: saved {path} at step {step}; resume with --resume auto")
                    result.interrupted = True
                    break
                if int(tr.ckpt_every) > 0 and step % int(tr.ckpt_every) == 0 and step < total:
                    save(step)
        final_model = ckpt.unsharded_copy(model) if is_fsdp(ddp) else model  # FSDP: a collective
        result.model = final_model  # callers get a plain model with the full weights
        if not result.interrupted:
            if result.last_checkpoint is None or ckpt.step_dir_name(step) != Path(result.last_checkpoint).name:
                save(step)
            if env.is_main:
                from uniperceiver.modeling.model_dir import save_model

                result.final_dir = save_model(final_model, run_dir / runs.FINAL_NAME,
                                              extra={"recipe": recipe.name, "stage": recipe.stage, "step": step})
            barrier(env)
            if result.final_dir is None:
                result.final_dir = run_dir / runs.FINAL_NAME
    finally:
        loader.close()
        if metrics is not None:
            metrics.close()
            runs.plot_curves(run_dir)
    result.skipped_media = {k: dict(v) for k, v in loader.skipped.items()}
    result.seconds = time.perf_counter() - began
    return result


def _to_device(value: Any, device: torch.device) -> Any:
    """Tensors of a batch (nested in dicts / lists / tuples) to the GPU; pinned ones asynchronously."""
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=value.is_pinned())
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _next_nonempty(loader: MultiTaskLoader) -> LoadedBatch:
    """The next draw with at least one loadable sample (empty draws are counted by the loader)."""
    while True:
        item = next(loader)
        if item.batch is not None:
            return item


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


def _log_window(
    metrics: runs.MetricsLog,
    step: int,
    window: list[tuple[str, float, dict[str, float]]],
    lr: float,
    grad_norm: float | None,
    samples_per_s: float,
    time_s: float,
) -> None:
    """Rows for the window since the last log: per task mean loss and stats; lr, grad norm, speed."""
    by_task: dict[str, list[tuple[float, dict[str, float]]]] = {}
    for name, value, stats in window:
        by_task.setdefault(name, []).append((value, stats))
    finite_all = [v for _, v, _ in window if math.isfinite(v)]
    head = {"lr": lr, "samples_per_s": samples_per_s}
    if finite_all:
        head["loss"] = float(np.mean(finite_all))
    if grad_norm is not None:
        head["grad_norm"] = grad_norm
    metrics.write(step, "train", "", head, time_s)
    for name, rows in sorted(by_task.items()):
        vals = [v for v, _ in rows if math.isfinite(v)]
        out: dict[str, float] = {"loss": float(np.mean(vals))} if vals else {}
        keys = sorted({k for _, s in rows for k in s})
        for k in keys:
            xs = [float(s[k]) for _, s in rows if k in s and isinstance(s[k], (int, float))]
            if xs:
                out[k] = float(np.mean(xs))
        if out:
            metrics.write(step, "train", name, out, time_s)


__all__ = ["EvalHook", "StepReport", "TrainResult", "TrainingDiverged", "resolve_precision", "train"]
