"""Evaluation as one library call: a checkpoint on disk + a task -> an `EvalResult`.

    from uniperceiver.evaluation.api import evaluate_checkpoint
    result = evaluate_checkpoint("runs/pretrain-tiny-20250101-120000", "mini-digits", limit=100)
    result.metrics, result.num_samples, result.skipped, result.checkpoint, result.to_dict()

Why a library call: `upctl zeroshot`, `upctl evaluate` and `upctl predict` (and through them the
demo) used to assemble this sequence themselves; now they parse arguments, call this and render.
The order is chosen so that bad input fails before the weights load: the task request is checked
first (unknown name, malformed custom file), then the checkpoint is resolved and its config read,
then the task is built on its prepared data (missing data fails here), and only then the weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import torch

from uniperceiver.errors import CheckpointError, ConfigError
from uniperceiver.evaluation.checkpoints import (
    TUNED_STAGES, newest_pretrained, newest_tuned, resolve_model_dir, run_info_of, run_tasks, tuned_task_config,
)
from uniperceiver.evaluation.harness import EvalOptions, EvalResult, evaluate_task
from uniperceiver.evaluation.target_cache import TargetCache, model_key_for
from uniperceiver.modeling.model_config import ModelConfig
from uniperceiver.modeling.model_dir import load_model, read_config
from uniperceiver.tasks.base import Task, TaskConfig
from uniperceiver.tasks.custom import CustomSpec, build_custom_task, is_custom_task_file, load_custom_spec
from uniperceiver.utils.progress import Progress

__all__ = ["TaskSource", "evaluate_checkpoint", "pick_device", "resolve_checkpoint", "tuned_elsewhere"]

#: What `evaluate_checkpoint` accepts as a task: a catalog name or alias ("mini-digits", "vqa"), a
#: custom task YAML file, a `TaskConfig` (a recipe's task entry) or an in-memory `CustomSpec`.
TaskSource = Union[str, Path, TaskConfig, CustomSpec]


def pick_device(device: str) -> torch.device:
    """"auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N"; a CUDA name without CUDA is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}")
    return dev


def resolve_checkpoint(checkpoint: str | Path | None, tuned_for: str | None = None) -> tuple[Path, bool]:
    """(model folder, defaulted): a model folder, a training step folder or a run folder (its final
    weights, else its newest valid checkpoint); None picks the newest pre-training run under ./runs,
    or with `tuned_for` the newest prompt-tuning or fine-tuning run of that task."""
    if checkpoint is None:
        return (newest_tuned(tuned_for) if tuned_for is not None else newest_pretrained()), True
    return resolve_model_dir(checkpoint), False


def tuned_elsewhere(model_dir: Path, task_name: str) -> list[str]:
    """The tasks `model_dir` was tuned on when its run tuned it for others than `task_name`, else [].

    Why: evaluating a model prompt-tuned for mini-digits on mini-faces runs fine and scores poorly;
    the run folder around the weights records what they were tuned for, so the caller can say so.
    """
    info = run_info_of(model_dir)
    tasks = run_tasks(info)
    if info.get("stage") not in TUNED_STAGES or not tasks or task_name in tasks:
        return []
    return tasks


@dataclass
class _TaskPlan:
    """A checked task request, built into a `Task` once the checkpoint's model config is known."""

    config: TaskConfig | None = None
    spec: CustomSpec | None = None
    #: Facts of the request for the record (task_requested / custom_task, candidates, top_k).
    facts: dict[str, Any] = field(default_factory=dict)

    def build(self, model_cfg: ModelConfig, data_dir: str | Path | None) -> Task:
        from uniperceiver.tokenizers.text import get_tokenizer

        if self.spec is not None:
            return build_custom_task(self.spec, get_tokenizer(), model_cfg)
        from uniperceiver.tasks.catalog import build_task

        assert self.config is not None
        return build_task(self.config, data_dir, model_cfg, get_tokenizer())


def _custom_plan(spec: CustomSpec, options: Mapping[str, Any]) -> _TaskPlan:
    """A custom task takes its options from its file; only `top_k` may be given with the call."""
    unknown = sorted(set(options) - {"top_k"})
    if unknown:
        raise ConfigError(f"task options {unknown} apply to catalog tasks; put options of a custom task in its "
                          "YAML file (only top_k can be given here)")
    if "top_k" in options:
        top_k = options["top_k"]
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise ConfigError(f"--top-k must be a positive integer, got {top_k!r}")
        spec = dataclasses.replace(spec, top_k=min(top_k, len(spec.classes)))
    return _TaskPlan(spec=spec, facts={"candidates": list(spec.classes), "top_k": spec.top_k})


def plan_task(task: TaskSource, options: Mapping[str, Any] | None = None,
              data_dir: str | Path | None = None) -> _TaskPlan:
    """Check a task request without loading anything heavy: unknown names and bad files fail here.
    A name not in the catalog may be a user's dataset prepared under `data_dir`."""
    options = dict(options or {})
    if isinstance(task, CustomSpec):
        return _custom_plan(task, options)
    if isinstance(task, TaskConfig):
        cfg = dataclasses.replace(task, options={**task.options, **options}) if options else task
        return _TaskPlan(config=cfg, facts={"task_requested": task.name})
    if isinstance(task, Path) or is_custom_task_file(str(task)):
        plan = _custom_plan(load_custom_spec(task), options)
        plan.facts["custom_task"] = str(Path(task).absolute())
        return plan
    from uniperceiver.tasks.catalog import resolve_task, task_config

    resolved = resolve_task(str(task), data_dir)  # a clear error for unknown names, with suggestions
    cfg = task_config(resolved.name, data_dir=data_dir, **({"options": options} if options else {}))
    return _TaskPlan(config=cfg, facts={"task_requested": str(task)})


def _check_head_fits(model: Any, task: Task) -> None:
    """A tuned classification head must have one row per candidate of the task it is evaluated on."""
    n_head = int(model.cfg.cls_head_classes)
    ts = task.target_set()
    if n_head and ts is not None and n_head != len(ts):
        raise CheckpointError(
            f"the checkpoint's classification head has {n_head} classes but task {task.cfg.name!r} has {len(ts)} "
            "candidates: evaluate it on the task it was tuned on"
        )


def _target_labels(task: Task) -> dict[str, Any]:
    """Class names / answers that predictions index (not the 49,411-entry vocabulary: its labels are ids)."""
    ts = task.target_set()
    if ts is None or ts.name.startswith("vocab"):
        return {}
    return {"target_labels": list(ts.labels)}


def _with_run_recipe(plan: _TaskPlan, model_dir: Path, options: Mapping[str, Any] | None,
                     notify: Callable[[str], None] | None) -> _TaskPlan:
    """A tuned run is evaluated with its own recipe's task entry (decoding, lengths, eval split),
    the call's `options` on top; the catalog's zero-shot entry applies to everything else."""
    own = tuned_task_config(model_dir, plan.config.name) if plan.config is not None else None
    if own is None:
        return plan
    merged = dataclasses.replace(own, options={**own.options, **dict(options or {})})
    if notify is not None and merged.options != plan.config.options:
        changed = {k: v for k, v in merged.options.items() if plan.config.options.get(k) != v}
        notify(f"task options from the run's recipe: {changed}")
    return _TaskPlan(config=merged, facts={**plan.facts, "options_from": "run recipe"})


def evaluate_checkpoint(
    checkpoint: str | Path | None,
    task: TaskSource,
    *,
    split: str | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    options: Mapping[str, Any] | None = None,
    data_dir: str | Path | None = None,
    device: str = "auto",
    cache_dir: str | Path | None = None,
    check_head: bool = False,
    tuned: bool = False,
    progress: Progress | None = None,
    notify: Callable[[str], None] | None = None,
    num_workers: int = 0,
) -> EvalResult:
    """Load the weights at `checkpoint`, build `task` on its prepared data and evaluate it.

    checkpoint: a model folder, a training step folder, a run folder, or None for the newest
        pre-training run under ./runs (then `notify` hears which one, and the result says so).
    task: see `TaskSource`; `options` are task options (`--set`) merged over the catalog's, or
        `{"top_k": k}` for a custom task.
    split: default the task's evaluation split; limit: the first N samples; batch_size: default
        the task's `eval_batch_size`; data_dir: default $UPCTL_DATA, else ./data.
    cache_dir: on-disk target-feature cache folder (None: in memory for this call only).
    check_head: the checkpoint was tuned on this task, so a classification head must fit it.
    tuned: evaluate a model tuned for this catalog task (`upctl evaluate`): implies check_head;
        checkpoint None picks the newest prompt-tuning or fine-tuning run of the task, and a run
        tuned for other tasks is reported through `notify` (and as `tuned_on` in the extras).
    num_workers: DataLoader workers that decode samples (0: the main process); same results.
    Returns the harness's `EvalResult` with `checkpoint`, `target_cache` and `extras` (the task's
    `evaluation_extras()`, the target labels, the request's facts) filled in.
    """
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be a positive number of samples, got {limit}")
    if num_workers < 0:
        raise ConfigError(f"--workers must be 0 or more, got {num_workers}")
    plan = plan_task(task, options, data_dir)
    task_name = plan.config.name if plan.config is not None else None
    if tuned and checkpoint is None and task_name is None:
        raise ConfigError("a custom task has no tuned runs to default to: pass --checkpoint DIR")
    model_dir, defaulted = resolve_checkpoint(checkpoint, tuned_for=task_name if tuned else None)
    if defaulted and notify is not None:
        which = f"tuned run of {task_name}" if tuned else "pre-training checkpoint"
        notify(f"using the newest {which}: {model_dir}")
    tuned_on = tuned_elsewhere(model_dir, task_name) if tuned and task_name is not None else []
    if tuned_on and notify is not None:
        notify(f"warning: {model_dir} was tuned on {', '.join(tuned_on)} (its run.json), not on {task_name}; "
               f"evaluating it on {task_name} anyway")
    if tuned and task_name is not None and not tuned_on:
        plan = _with_run_recipe(plan, model_dir, options, notify)
    built = plan.build(read_config(model_dir), data_dir)  # missing data fails before the weights load
    model = load_model(model_dir).to(pick_device(device)).eval()
    if check_head or tuned:
        _check_head_fits(model, built)
    cache = TargetCache(cache_dir)
    result = evaluate_task(model, built, EvalOptions(
        split=split or built.cfg.eval_split, limit=limit, batch_size=batch_size, progress=progress,
        target_cache=cache, model_key=model_key_for(model, model_dir), num_workers=num_workers,
    ))
    result.checkpoint, result.checkpoint_default = model_dir, defaulted
    result.target_cache = {"dir": None if cache.dir is None else str(cache.dir), "hits": cache.hits,
                           "disk_hits": cache.disk_hits, "misses": cache.misses}
    result.extras = {**plan.facts, **_target_labels(built), **built.evaluation_extras(),
                     **({"tuned_on": tuned_on} if tuned_on else {})}
    return result
