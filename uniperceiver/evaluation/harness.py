"""Run one task's evaluation split: load, batch, predict, gather across ranks, score.

Why one harness: zero-shot, prompt-tuned and fine-tuned checkpoints, the trainer's periodic
evaluation and user-defined tasks all evaluate the same way, so they report comparable numbers.

    result = evaluate_task(model, task, split="val", limit=100, target_cache=TargetCache(dir))
    result.metrics, result.predictions, result.num_samples, result.skipped, result.seconds

From a checkpoint on disk (model folder, run folder) rather than a model in memory, use
`uniperceiver.evaluation.api.evaluate_checkpoint`, which resolves, loads and calls this.

Samples whose media cannot be read are skipped and counted by kind (`missing_media`,
`unreadable_media`, ...): the metric covers `num_samples` samples, never silently fewer. Under
`torchrun` every rank evaluates a strided shard (`rank::world`) and the predictions are gathered
once with `all_gather_object`, then put back in split order, so the result equals a single-process
run (up to float noise from different batch compositions).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from uniperceiver.errors import DataError, UpctlError
from uniperceiver.evaluation.sample_loading import iter_loaded
from uniperceiver.evaluation.target_cache import TargetCache, model_key_for
from uniperceiver.tasks.base import Task
from uniperceiver.utils.progress import Progress

__all__ = [
    "EvalOptions",
    "EvalResult",
    "evaluate_task",
    "target_features",
    "dist_info",
    "split_predictions",
    "join_predictions",
    "Progress",
]


@dataclass
class EvalResult:
    """What one evaluation produced; `predictions` are in split order, one per evaluated sample.

    `evaluate_task` fills the first block; `evaluate_checkpoint` (evaluation/api.py) also fills
    `checkpoint`, `checkpoint_default`, `target_cache` and `extras` (the task's
    `evaluation_extras()` plus facts of the request such as the custom task's candidates).
    """

    metrics: dict[str, float]
    predictions: list[dict]
    num_samples: int
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    task: str = ""
    split: str = ""
    #: Samples asked for (the split, or its first `limit`): num_samples + sum(skipped).
    requested: int = 0
    dataset: str = ""
    family: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    #: The model folder the weights came from, and whether it was picked by default (newest pre-training run).
    checkpoint: Path | None = None
    checkpoint_default: bool = False
    #: Target-feature cache counters: {"dir", "hits", "disk_hits", "misses"}.
    target_cache: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record without the predictions (they may hold tensors): what `--json` files hold."""
        out: dict[str, Any] = {
            "task": self.task,
            "split": self.split,
            "dataset": self.dataset,
            "family": self.family,
            "options": dict(self.options),
            "metrics": dict(self.metrics),
            "num_samples": self.num_samples,
            "requested": self.requested,
            "skipped": dict(self.skipped),
            "seconds": round(self.seconds, 3),
        }
        if self.checkpoint is not None:
            out["checkpoint"] = str(Path(self.checkpoint).absolute())
            out["checkpoint_default"] = self.checkpoint_default
        if self.target_cache:
            out["target_cache"] = dict(self.target_cache)
        out.update(self.extras)
        return out


@dataclass(frozen=True)
class EvalOptions:
    """How `evaluate_task` runs: everything but the model and the task.

    `limit` keeps the first N samples of the split (before sharding, so every world size scores
    the same samples). `batch_size` defaults to the task's `eval_batch_size`. `model_key` names the
    weights for the target cache (default: `state_digest`). `samples` replaces
    `task.examples(split)` (custom tasks, tests). `rank` / `world_size` default to
    torch.distributed's; given explicitly without a process group, only that shard is evaluated
    and scored (manual sharding across separate jobs). `num_workers` > 0 decodes samples in that
    many DataLoader workers (evaluation/sample_loading.py): same predictions, same order.
    """

    split: str = "val"
    limit: int | None = None
    batch_size: int | None = None
    progress: Progress | None = None
    target_cache: TargetCache | None = None
    model_key: str | None = None
    rank: int | None = None
    world_size: int | None = None
    samples: Sequence[dict] | None = None
    num_workers: int = 0


def dist_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): explicit values win, else torch.distributed when initialised, else (0, 1)."""
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
        return (r if rank is None else int(rank)), (w if world_size is None else int(world_size))
    return (0 if rank is None else int(rank)), (1 if world_size is None else int(world_size))


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def target_features(
    model: torch.nn.Module,
    task: Task,
    cache: TargetCache | None = None,
    model_key: str | None = None,
) -> Tensor | None:
    """The encoded shared candidates of `task` (None when it has none, e.g. retrieval), through
    `task.encode_target_set` and, when given, the cache (keyed by weights and `TargetSet.key`)."""
    ts = task.target_set()
    if ts is None:
        return None

    def compute() -> Tensor:
        return task.encode_target_set(model, ts)  # type: ignore[arg-type]

    if cache is None:
        with torch.no_grad():
            return compute().detach()
    key = model_key or model_key_for(model)
    return cache.get(key, ts, compute, device=model.device)  # type: ignore[attr-defined]


def _to_cpu(value: Any) -> Any:
    """Predictions leave the device before gathering (pickling CUDA tensors ties them to a GPU)."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_cpu(v) for v in value)
    return value


def evaluate_task(model: torch.nn.Module, task: Task, options: EvalOptions | None = None, **fields: Any) -> EvalResult:
    """Evaluate `task` on a split and return metrics plus per-sample predictions.

    Settings come as an `EvalOptions` or as its fields by keyword (`split="val", limit=100,
    batch_size=8, progress=..., target_cache=..., model_key=..., rank=..., world_size=...,
    samples=..., num_workers=...`), which the trainer's periodic evaluation and the tests use.
    Raises DataError when the split is empty or no sample could be loaded.
    """
    opts = dataclasses.replace(options, **fields) if options is not None else EvalOptions(**fields)
    start = time.perf_counter()
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module  # tasks call encode / logits on the model itself; no DDP sync at eval
    rank, world = dist_info(opts.rank, opts.world_size)
    examples = _examples(task, opts)
    bs = int(opts.batch_size or task.eval_batch_size)
    if bs < 1:
        raise UpctlError(f"batch size must be positive, got {bs}")
    local, skipped = _predict(model, task, examples, opts, rank, world, bs)
    gather = world > 1 and _distributed()
    merged, skipped = _gather(local, skipped, world) if gather else (local, skipped)
    predictions = _in_split_order(task, merged, skipped, len(examples), opts.split)
    cfg = task.cfg
    return EvalResult(
        metrics=_compute_metrics(task, predictions, rank, world if gather else 1),
        predictions=predictions,
        num_samples=len(predictions),
        skipped=dict(sorted(skipped.items())),
        seconds=time.perf_counter() - start,
        task=cfg.name,
        split=opts.split,
        requested=len(examples) if gather or world == 1 else len(range(rank, len(examples), world)),
        dataset=cfg.dataset,
        family=cfg.family,
        options=dict(cfg.options),
    )


def _examples(task: Task, opts: EvalOptions) -> Sequence[dict]:
    """The split's samples (or `opts.samples`), cut to `opts.limit`; an empty result is an error.

    Kept as the task gives them (a memory-mapped manifest reads one row per index): never
    copied into a list per rank and per loader worker.
    """
    if opts.limit is not None and opts.limit < 1:
        raise UpctlError(f"--limit must be a positive number of samples, got {opts.limit}")
    if opts.num_workers < 0:
        raise UpctlError(f"--workers must be 0 or more, got {opts.num_workers}")
    examples = task.examples(opts.split) if opts.samples is None else opts.samples
    if opts.limit is not None and opts.limit < len(examples):
        examples = examples[: opts.limit]
    if not examples:
        raise DataError(f"task {task.cfg.name!r}: split {opts.split!r} has no samples to evaluate")
    return examples


def _predict(model: torch.nn.Module, task: Task, examples: Sequence[dict], opts: EvalOptions, rank: int, world: int,
             bs: int) -> tuple[list[tuple[int, dict]], dict[str, int]]:
    """This rank's predictions in eval mode without gradients; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model_key = opts.model_key
            if opts.target_cache is not None and model_key is None:
                model_key = model_key_for(model)
            targets = target_features(model, task, opts.target_cache, model_key)
            return _run_shard(model, task, examples, (rank, world), bs, targets, opts)
    finally:
        model.train(was_training)


def _gather(local: list[tuple[int, dict]], skipped: dict[str, int], world: int
            ) -> tuple[list[tuple[int, dict]], dict[str, int]]:
    """Every rank's (index, prediction) pairs and skip counts, merged on every rank."""
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, (local, skipped))
    merged: list[tuple[int, dict]] = []
    total: dict[str, int] = {}
    for part_preds, part_skipped in gathered:
        merged.extend(part_preds)
        for reason, count in part_skipped.items():
            total[reason] = total.get(reason, 0) + count
    return merged, total


def _in_split_order(task: Task, merged: list[tuple[int, dict]], skipped: dict[str, int], n_examples: int,
                    split: str) -> list[dict]:
    """Predictions sorted by split index; duplicates (a sharding bug) and an empty result are errors."""
    name = task.cfg.name
    merged = sorted(merged, key=lambda pair: pair[0])
    seen = [i for i, _ in merged]
    if len(set(seen)) != len(seen):  # a sharding bug must never double-count samples
        raise UpctlError(f"task {name!r}: evaluation gathered duplicate samples")
    predictions = [pred for _, pred in merged]
    if not predictions:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "nothing loaded"
        raise DataError(f"task {name!r}: none of the {n_examples} samples of split {split!r} could be loaded ({detail})")
    return predictions


def _run_shard(
    model: torch.nn.Module,
    task: Task,
    examples: Sequence[dict],
    shard: tuple[int, int],
    bs: int,
    targets: Tensor | None,
    opts: EvalOptions,
) -> tuple[list[tuple[int, dict]], dict[str, int]]:
    """Evaluate this rank's strided shard (rank, world); returns ([(split index, prediction)], skipped counts)."""
    rank, world = shard
    indices = range(rank, len(examples), world)
    desc = f"evaluating {task.cfg.name} ({opts.split})"
    report = opts.progress if rank == 0 else None
    out: list[tuple[int, dict]] = []
    skipped: dict[str, int] = {}
    pending: list[tuple[int, dict]] = []
    done = 0
    if report:
        report(0, len(indices), desc)

    def flush() -> None:
        if not pending:
            return
        batch = task.collate([item for _, item in pending], train=False, rng=np.random.default_rng(0))
        preds = task.evaluate_batch(model, batch, targets)  # type: ignore[arg-type]
        if len(preds) != len(pending):
            raise UpctlError(
                f"task {task.cfg.name!r}: evaluate_batch returned {len(preds)} predictions for {len(pending)} samples"
            )
        out.extend((idx, _to_cpu(pred)) for (idx, _), pred in zip(pending, preds, strict=True))
        pending.clear()

    for idx, item, reason in iter_loaded(task, examples, indices, bs, opts.num_workers):
        if item is None:
            skipped[str(reason)] = skipped.get(str(reason), 0) + 1
        else:
            pending.append((idx, item))
            if len(pending) >= bs:
                flush()
        done += 1
        if report and (done % bs == 0 or done == len(indices)):
            report(done, len(indices), desc)
    flush()
    return out, skipped


def _compute_metrics(task: Task, predictions: list[dict], rank: int, world: int) -> dict[str, float]:
    """Metrics once (rank 0), shared with the other ranks: caption metrics start Java processes."""
    if world <= 1:
        return {k: float(v) for k, v in task.compute_metrics(predictions).items()}
    payload: list[Any] = [None]
    failure: BaseException | None = None
    if rank == 0:
        try:
            payload = [("ok", {k: float(v) for k, v in task.compute_metrics(predictions).items()})]
        except Exception as exc:  # noqa: BLE001 - the other ranks must not wait forever
            failure = exc
            payload = [("error", str(exc) if isinstance(exc, UpctlError) else f"{type(exc).__name__}: {exc}")]
    torch.distributed.broadcast_object_list(payload, src=0)
    if failure is not None:
        raise failure
    status, value = payload[0]
    if status == "error":
        raise UpctlError(f"metrics failed on rank 0: {value}")
    return value


# -------------------------------------------------------------------------------- saving predictions

TENSOR_REF = "__tensor__"


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def split_predictions(predictions: Sequence[dict]) -> tuple[list[dict], dict[str, Tensor]]:
    """Predictions -> (JSON-able dicts, tensors to save beside them with safetensors).

    A top-level field holding same-shaped tensors in every prediction (retrieval features) is
    stacked into one tensor named after the field, and each prediction keeps
    `{"__tensor__": field, "row": i}`; any other tensor (or numpy array) is saved under
    `"<index>.<path>"` and referenced as `{"__tensor__": key}`. `join_predictions` undoes this.
    """
    tensors: dict[str, Tensor] = {}
    first: dict[str, Tensor] = {}
    stack_ok: dict[str, bool] = {}
    for pred in predictions:
        for key, value in pred.items():
            t = torch.as_tensor(value) if isinstance(value, np.ndarray) else value
            if not isinstance(t, Tensor):
                stack_ok[key] = False
            elif key not in first:
                first[key] = t
                stack_ok.setdefault(key, True)
            elif tuple(t.shape) != tuple(first[key].shape) or t.dtype != first[key].dtype:
                stack_ok[key] = False
    stack_keys = {k for k, ok in stack_ok.items() if ok and all(k in p for p in predictions)}
    for key in sorted(stack_keys):
        tensors[key] = torch.stack([torch.as_tensor(p[key]).detach().cpu() for p in predictions]).contiguous()

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, (Tensor, np.ndarray)):
            name = path
            tensors[name] = torch.as_tensor(value).detach().cpu().contiguous()
            return {TENSOR_REF: name}
        if isinstance(value, dict):
            return {str(k): walk(v, f"{path}.{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(value)]
        return _jsonable(value)

    out = []
    for i, pred in enumerate(predictions):
        row = {}
        for key, value in pred.items():
            row[str(key)] = {TENSOR_REF: key, "row": i} if key in stack_keys else walk(value, f"{i}.{key}")
        out.append(row)
    return out, tensors


def join_predictions(rows: Sequence[dict], tensors: dict[str, Tensor]) -> list[dict]:
    """Inverse of `split_predictions`: put the saved tensors back into the prediction dicts."""

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            if TENSOR_REF in value and set(value) <= {TENSOR_REF, "row"}:
                name = value[TENSOR_REF]
                if name not in tensors:
                    raise DataError(f"saved predictions refer to tensor {name!r}, which the tensor file lacks")
                t = tensors[name]
                return t[int(value["row"])] if "row" in value else t
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return [walk(r) for r in rows]
