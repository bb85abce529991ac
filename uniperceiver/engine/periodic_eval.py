"""Evaluation during training (`train.eval_every`): every task through the evaluation harness.

Why in the engine: what is evaluated (which split, how many samples), when, and where the scores
go (the run's metrics.csv / TensorBoard, the TrainState, one log line) belong to the run, so every
caller of `train` gets the same behaviour; a front end only renders the log line it is given.

A caller may still pass its own hook (`train(..., evaluate=hook)`, hook(model, tasks, step) ->
{"task/metric": value}); the default hook is `harness_hook(recipe.eval, recipe.train.num_workers)`.
Under data parallelism every rank calls the hook (the harness shards the samples and gathers the
scores); under FSDP the parameters are gathered for it (`full_params`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from torch import nn

from uniperceiver.config.schema import EvalSection
from uniperceiver.engine.distributed import full_params
from uniperceiver.engine.runs import MetricsLog
from uniperceiver.modeling.model import UniPerceiver
from uniperceiver.tasks.base import Task

if TYPE_CHECKING:  # the harness is imported when an evaluation runs
    from uniperceiver.evaluation.harness import EvalResult

EvalHook = Callable[[UniPerceiver, Sequence[Task], int], dict[str, float]]
Log = Callable[[str], None]


def eval_split(task: Task, wanted: str) -> str | None:
    """`wanted` (eval.split) when the task's dataset has it, else the task's own eval split, else None.

    A split the task trains on is never evaluated: the reference's training pools include val
    (COCO, Flickr30k, MSVD, MSR-VTT train + val; VQAv2 train + val minus `minval`), so the default
    `eval.split: val` would score training data there; the task's own held-out split is used instead.
    """
    splits = task.dataset.splits
    trained = set(task.dataset.split_parts(task.cfg.split)) if task.dataset.has_split(task.cfg.split) else set()
    for split in (wanted, task.cfg.eval_split):
        if split in splits and split not in trained:
            return split
    return None


def evaluate_tasks(model: UniPerceiver, tasks: Sequence[Task], section: EvalSection,
                   num_workers: int = 0) -> dict[str, EvalResult]:
    """{task name: result} of `evaluate_task` on every task that has a split to evaluate (`eval_split`),
    the first `eval.limit` samples of it, decoded by `num_workers` loader processes (0: in this
    process; the same predictions either way). The default hook reports these results' metrics."""
    from uniperceiver.evaluation.harness import evaluate_task

    out: dict[str, EvalResult] = {}
    for task in tasks:
        split = eval_split(task, section.split)
        if split is not None:
            out[task.cfg.name] = evaluate_task(model, task, split=split, limit=section.limit, num_workers=num_workers)
    return out


def harness_hook(section: EvalSection, num_workers: int = 0) -> EvalHook:
    """The default hook: the metrics of `evaluate_tasks`, as {"task/metric": value}. The trainer
    passes `train.num_workers`: evaluation decodes media with as many workers as training does."""

    def hook(model: UniPerceiver, tasks: Sequence[Task], step: int) -> dict[str, float]:
        results = evaluate_tasks(model, tasks, section, num_workers)
        return {f"{name}/{k}": float(v) for name, result in results.items() for k, v in result.metrics.items()}

    return hook


def describe(step: int, scores: dict[str, float]) -> str:
    """The log line of one evaluation, e.g. "eval at step 200: mini-faces/top1 81.25"."""
    return f"eval at step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items())


@dataclass
class PeriodicEval:
    """Runs `hook` every `every` steps and reports the scores (metrics log and `say`, rank 0 only).

    `metrics` and `say` are None on ranks other than 0; `began` is the run's start
    (`time.perf_counter()`), for the metrics' time column.
    """

    every: int
    hook: EvalHook
    metrics: MetricsLog | None
    say: Log | None
    began: float

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def __call__(self, model: UniPerceiver, wrapped: nn.Module, tasks: Sequence[Task], step: int) -> dict[str, float]:
        """Evaluate `model` (the bare model inside `wrapped`) at `step`, then put it back in training mode."""
        with full_params(wrapped):
            scores = dict(self.hook(model, tasks, step))
        model.train()
        if scores and self.metrics is not None:
            self.metrics.write(step, "eval", "", scores, time.perf_counter() - self.began)
        if scores and self.say is not None:
            self.say(describe(step, scores))
        return scores


__all__ = ["EvalHook", "PeriodicEval", "describe", "eval_split", "evaluate_tasks", "harness_hook"]
