"""The recipe schema: plain dataclasses, and the checks that turn a YAML mapping into a `Recipe`.

A recipe says what to train (tasks and their mixture), on which model, with which optimiser and
schedule. Everything is checked when the recipe is loaded, so a typo fails in the first second of
a run with one line that names the file, the dotted key and what is allowed, instead of hours
later inside the trainer. Constraints live next to the fields (dataclass `metadata`), so the
schema and its checks cannot drift apart.

Task entries are `TaskConfig`s (uniperceiver/tasks/options.py). A task `name` found in the catalog
(uniperceiver/tasks/catalog.py) starts from the catalog's defaults; any other name must give
`family` and `dataset` itself. A task's `options` are checked by its family's typed `Options`
dataclass (uniperceiver/tasks/options.py), which holds each option's type, default and rules, and
are stored complete (every option, resolved).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from uniperceiver.errors import ConfigError
from uniperceiver.modeling.model_config import SIZES
from uniperceiver.tasks import catalog
from uniperceiver.tasks.options import (
    FieldError,
    TaskConfig,
    check_value,
    show,
    suggest,
    unknown_key,
)
from uniperceiver.tasks.options import opt as _f

#: The task families every recipe may use (tasks/catalog.py maps each to its class).
FAMILIES: tuple[str, ...] = tuple(catalog.FAMILIES)
STAGES: tuple[str, ...] = ("pretrain", "prompt_tune", "finetune")


@dataclass
class ModelSection:
    """Which model. `overrides` are `ModelConfig` fields (image_size, drop_path, prompt_tokens, ...).

    `checkpoint` (a model directory) gives the initial weights; its saved architecture wins over
    `size`, while `overrides` still apply (resolution, drop path, prompt parameters).
    """

    size: str = _f("tiny", choices=tuple(SIZES))
    overrides: dict[str, Any] = _f(factory=dict)
    checkpoint: str | None = None


@dataclass
class OptimSection:
    """AdamW and the learning-rate schedule (reference: lr 1e-3, betas (0.9, 0.95), eps 1e-6, wd 0.2)."""

    lr: float = _f(1e-3, gt=0)
    betas: tuple[float, float] = _f((0.9, 0.95), ge=0, lt=1)
    eps: float = _f(1e-6, gt=0)
    weight_decay: float = _f(0.2, ge=0)
    #: Gradient-norm clipping; 0 or null = no clipping.
    clip_grad: float | None = _f(0.1, ge=0)
    warmup_steps: int = _f(10000, ge=0)
    min_lr: float = _f(1e-6, ge=0)
    schedule: str = _f("cosine", choices=("cosine", "constant", "linear"))
    #: Layer-wise lr decay for fine-tuning (None = off).
    layer_decay: float | None = _f(None, gt=0, le=1)


@dataclass
class TrainSection:
    """The loop: length, precision, logging, checkpoints, failure policy."""

    max_steps: int = _f(1000, gt=0)
    grad_accum: int = _f(1, ge=1)
    #: "auto": bf16 where the GPU supports it, else fp16 with loss scaling on GPU, fp32 on CPU.
    precision: str = _f("auto", choices=("auto", "fp32", "bf16", "fp16"))
    seed: int = _f(42, ge=0)
    log_every: int = _f(10, ge=1)
    eval_every: int = _f(0, ge=0)
    ckpt_every: int = _f(500, ge=0)
    keep_checkpoints: int = _f(3, ge=1)
    nan_policy: str = _f("stop", choices=("stop", "skip"))
    num_workers: int = _f(0, ge=0)
    compile: bool = False
    #: Cross-rank feature gathering for retrieval; None = the reference rule (only when one task is trained).
    gather_features: bool | None = None
    #: Data parallelism on several ranks: "ddp" replicates the model; "fsdp" shards parameters,
    #: gradients and optimizer state (FSDP2); checkpoints are the same files either way.
    sharding: str = _f("ddp", choices=("ddp", "fsdp"))
    #: A rank with no optimizer step for this long logs its phase and stack and ends the job
    #: (engine/watchdog.py); None = 300 s past twice the slowest step seen (900 s for the first).
    step_timeout_s: float | None = _f(None, gt=0)
    #: The process group's own timeout (init_process_group): the last resort behind the watchdog.
    collective_timeout_s: float = _f(1800.0, gt=0)


@dataclass
class TuneSection:
    """What is trained: everything ("full") or the prompt parameters ("prompt"), and on how much data."""

    mode: str = _f("full", choices=("full", "prompt"))
    prompt_tokens: int = _f(10, ge=1)
    #: Prompt mode: targets share the inputs' deep prompts (true) or get their own (false: the
    #: reference's retrieval prompt tuning, SHARE_DEEP_PROMPT False).
    share_deep_prompt: bool = True
    #: Seeded few-shot subset of the training split (0.01 = the paper's 1%); None = all data.
    fraction: float | None = _f(None, gt=0, le=1)
    fraction_seed: int = _f(0, ge=0)


@dataclass
class EvalSection:
    """The periodic evaluation (`train.eval_every`): which split of every task, how many samples.

    Decoding settings are not here: as in the reference (each task's DECODE_STRATEGY), they are
    options of the caption task they apply to (`tasks[i].options.beam_size`, `max_gen_len`,
    `length_penalty`), so one run can decode COCO and MSVD differently; `MOVED_KEYS` points there.
    """

    #: The split evaluated when the task's dataset has it, else the task's own `eval_split`.
    split: str = "val"
    #: The first N samples of that split; None = all.
    limit: int | None = _f(None, gt=0)


@dataclass
class StageSection:
    """One stage of a multi-stage run: dotted-key overrides applied on top of the recipe.

    The trainer runs the stages in order; stage N+1 starts from stage N's final weights.
    """

    name: str
    set: dict[str, Any] = _f(factory=dict)


@dataclass
class Recipe:
    """A whole run. See recipes/*.yaml for examples and docs/INTERFACES.md for the contract."""

    name: str
    stage: str = _f("pretrain", choices=STAGES)
    model: ModelSection = _f(factory=ModelSection)
    tasks: list[TaskConfig] = _f(factory=list)
    optim: OptimSection = _f(factory=OptimSection)
    train: TrainSection = _f(factory=TrainSection)
    tune: TuneSection = _f(factory=TuneSection)
    eval: EvalSection = _f(factory=EvalSection)
    stages: list[StageSection] = _f(factory=list)
    data_dir: str | None = None
    #: One line for `upctl recipes`.
    description: str = ""


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "optim": OptimSection,
    "train": TrainSection,
    "tune": TuneSection,
    "eval": EvalSection,
}

#: Keys that live elsewhere now: the one-line error says where (dotted key -> where it went).
MOVED_KEYS: dict[str, str] = {
    f"eval.{name}": f"decoding is set per caption task: tasks[i].options.{name}"
    for name in ("beam_size", "max_gen_len", "length_penalty")
}

#: Checks for TaskConfig fields.
TASK_RULES: dict[str, dict[str, Any]] = {
    "batch_size": {"gt": 0},
    "sample_weight": {"ge": 0},
    "loss_weight": {"ge": 0},
}

def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def build_section(cls: type, raw: Any, key: str) -> Any:
    """A section dataclass from a mapping: unknown keys, types and rules are checked."""
    if raw is None:
        raw = {}
    fields = _fields(cls)
    if not isinstance(raw, dict):
        raise FieldError(key, f"expected a mapping with keys {', '.join(fields)}, got {show(raw)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        if name not in fields:
            moved = MOVED_KEYS.get(f"{key}.{name}")
            if moved is not None:
                raise FieldError(f"{key}.{name}", f"unknown key (allowed: {', '.join(fields)}); {moved}")
            raise unknown_key(key, name, fields)
        kwargs[name] = check_value(value, hints[name], f"{key}.{name}", dict(fields[name].metadata))
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise FieldError(f"{key}.{missing[0]}", "is required")
    return cls(**kwargs)


# -- tasks -------------------------------------------------------------------------------------------


def canonical_task_name(name: str) -> str | None:
    """The catalog's name for `name` (aliases, case and '_' resolved as the catalog does), or None."""
    if not isinstance(name, str):
        return None
    try:
        return catalog.resolve_task(name).name
    except ConfigError:
        return None


def build_task(raw: Any, key: str) -> TaskConfig:
    """One `tasks:` entry: a catalog name (string or mapping) or a full custom entry."""
    if isinstance(raw, str):
        raw = {"name": raw}
    fields = _fields(TaskConfig)
    if not isinstance(raw, dict):
        raise FieldError(key, f"expected a task name or a mapping with keys {', '.join(fields)}, got {show(raw)}")
    for name in raw:
        if name not in fields:
            raise unknown_key(key, name, fields)
    if "name" not in raw:
        raise FieldError(f"{key}.name", "is required (a catalog task, see `upctl tasks`, or your own name)")
    name = check_value(raw["name"], str, f"{key}.name")
    canonical = canonical_task_name(name)
    merged: dict[str, Any]
    if canonical is not None:
        merged = dataclasses.asdict(catalog.task_config(canonical))
        merged["name"] = canonical
        if "family" in raw and raw["family"] != merged["family"]:
            raise FieldError(f"{key}.family", f"{raw['family']!r} contradicts catalog task {canonical!r}, "
                                              f"which is {merged['family']!r}; use another name for a custom task")
    else:
        missing = [k for k in ("family", "dataset") if k not in raw]
        if missing:
            raise FieldError(f"{key}.name", f"task {name!r} is not in the task catalog{suggest(name, catalog.CATALOG)}; "
                                            f"use a catalog task (`upctl tasks`) or give {' and '.join(missing)} explicitly")
        merged = {"name": name, "options": {}}
    hints = typing.get_type_hints(TaskConfig)
    for fname, value in raw.items():
        if fname in ("name", "options"):
            continue
        merged[fname] = value
    options = dict(merged.get("options") or {})
    if "options" in raw:
        options.update(check_value(raw["options"], dict[str, Any], f"{key}.options"))
    for fname, value in list(merged.items()):
        if fname in ("name", "options"):
            continue
        merged[fname] = check_value(value, hints[fname], f"{key}.{fname}", TASK_RULES.get(fname))
    if merged["family"] not in FAMILIES:
        raise FieldError(f"{key}.family", f"{merged['family']!r} is not a task family{suggest(merged['family'], FAMILIES)} "
                                          f"(allowed: {', '.join(FAMILIES)})")
    options = catalog.resolved_options(merged["family"], options, f"{key}.options")
    merged["options"] = options
    return TaskConfig(**merged)


# -- the whole recipe --------------------------------------------------------------------------------


def _check_model(model: ModelSection, tune: TuneSection) -> None:
    """model.overrides must be ModelConfig fields with valid values (checked by ModelConfig itself)."""
    from uniperceiver.modeling.model_config import ModelConfig, model_config

    allowed = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "size"]
    for name in model.overrides:
        if name not in allowed:
            raise unknown_key("model.overrides", name, allowed)
    try:
        model_config(model.size, **model.overrides)
    except (ConfigError, TypeError, ValueError) as exc:
        raise FieldError("model.overrides", str(exc)) from None
    pt = model.overrides.get("prompt_tokens")
    if pt is not None and tune.mode == "prompt" and pt != tune.prompt_tokens:
        raise FieldError("model.overrides.prompt_tokens",
                         f"{pt} contradicts tune.prompt_tokens={tune.prompt_tokens}; set only tune.prompt_tokens")


def build_recipe(raw: Any, default_name: str = "recipe") -> Recipe:
    """Check a plain mapping (YAML after overrides) and build the `Recipe`. Raises FieldError."""
    fields = _fields(Recipe)
    if not isinstance(raw, dict):
        raise FieldError("", f"a recipe must be a mapping with keys {', '.join(fields)}, got {show(raw)}")
    for name in raw:
        if name not in fields:
            raise unknown_key("", name, fields)
    name = check_value(raw.get("name", default_name), str, "name")
    stage = check_value(raw.get("stage", "pretrain"), str, "stage", dict(fields["stage"].metadata))
    sections = {sec: build_section(cls, raw.get(sec), sec) for sec, cls in SECTIONS.items()}
    tune_raw = raw.get("tune") or {}
    if stage == "prompt_tune" and "mode" not in tune_raw:
        sections["tune"].mode = "prompt"
    if (stage == "prompt_tune") != (sections["tune"].mode == "prompt"):
        raise FieldError("tune.mode", f"{sections['tune'].mode!r} does not fit stage {stage!r} "
                                      "(allowed: 'prompt' with stage prompt_tune, 'full' otherwise)")
    optim = sections["optim"]
    if optim.min_lr > optim.lr:
        raise FieldError("optim.min_lr", f"{optim.min_lr} is above optim.lr={optim.lr}")
    _check_model(sections["model"], sections["tune"])
    tasks_raw = raw.get("tasks")
    if not isinstance(tasks_raw, list) or not tasks_raw:
        raise FieldError("tasks", f"expected a non-empty list of tasks, got {show(tasks_raw)}")
    tasks = [build_task(t, f"tasks[{i}]") for i, t in enumerate(tasks_raw)]
    seen: dict[str, int] = {}
    for i, t in enumerate(tasks):
        if t.name in seen:
            raise FieldError(f"tasks[{i}].name", f"duplicate task {t.name!r} (also tasks[{seen[t.name]}]); "
                                                 "task names must be unique")
        seen[t.name] = i
    if not any(t.sample_weight > 0 for t in tasks):
        raise FieldError("tasks", "every sample_weight is 0: at least one task must be drawn")
    stages_raw = raw.get("stages") or []
    if not isinstance(stages_raw, list):
        raise FieldError("stages", f"expected a list of {{name, set}} mappings, got {show(stages_raw)}")
    stages = [build_section(StageSection, s, f"stages[{i}]") for i, s in enumerate(stages_raw)]
    names = [s.name for s in stages]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise FieldError(f"stages[{i}].name", f"duplicate stage name {n!r}")
    return Recipe(
        name=name,
        stage=stage,
        tasks=tasks,
        stages=stages,
        data_dir=check_value(raw.get("data_dir"), str | None, "data_dir"),
        description=check_value(raw["description"], str, "description") if raw.get("description") else "",
        **sections,
    )
