"""The recipe schema: plain dataclasses, and the checks that turn a YAML mapping into a `Recipe`.

A recipe says what to train (tasks and their mixture), on which model, with which optimiser and
schedule. Everything is checked when the recipe is loaded, so a typo fails in the first second of
a run with one line that names the file, the dotted key and what is allowed, instead of hours
later inside the trainer. Constraints live next to the fields (dataclass `metadata`), so the
schema and its checks cannot drift apart.

Task entries are `TaskConfig`s (uniperceiver/tasks/base.py). A task `name` found in the catalog
(uniperceiver/tasks/catalog.py) starts from the catalog's defaults; any other name must give
`family` and `dataset` itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from uniperceiver.errors import ConfigError
from uniperceiver.modeling.model_config import SIZES
from uniperceiver.tasks.base import TaskConfig

#: The task families every recipe may use (tasks/catalog.py maps each to its class).
FAMILIES: tuple[str, ...] = ("image_cls", "video_cls", "retrieval", "caption", "mlm", "vqa", "glue")
STAGES: tuple[str, ...] = ("pretrain", "prompt_tune", "finetune")


def _f(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None, **rules: Any) -> Any:
    """A dataclass field with validation rules: choices, gt, ge, le, lt (checked on load)."""
    if factory is not None:
        return field(default_factory=factory, metadata=rules)
    return field(default=default, metadata=rules)


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


@dataclass
class TuneSection:
    """What is trained: everything ("full") or the prompt parameters ("prompt"), and on how much data."""

    mode: str = _f("full", choices=("full", "prompt"))
    prompt_tokens: int = _f(10, ge=1)
    #: Seeded few-shot subset of the training split (0.01 = the paper's 1%); None = all data.
    fraction: float | None = _f(None, gt=0, le=1)
    fraction_seed: int = _f(0, ge=0)


@dataclass
class EvalSection:
    """Evaluation during and after training."""

    split: str = "val"
    limit: int | None = _f(None, gt=0)
    beam_size: int = _f(2, ge=1)
    max_gen_len: int = _f(21, ge=1)
    length_penalty: float = 0.0


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

#: Checks for TaskConfig fields.
TASK_RULES: dict[str, dict[str, Any]] = {
    "batch_size": {"gt": 0},
    "sample_weight": {"ge": 0},
    "loss_weight": {"ge": 0},
}

#: Types and ranges of the task options every family shares; other option keys pass through to the family.
OPTION_RULES: dict[str, tuple[Any, dict[str, Any]]] = {
    "image_size": (int, {"gt": 0}),
    "frames": (int, {"gt": 0}),
    "stride": (int, {"gt": 0}),
    "max_len": (int, {"gt": 0}),
    "label_smoothing": (float, {"ge": 0, "lt": 1}),
    "mixup": (float, {"ge": 0}),
    "cutmix": (float, {"ge": 0}),
    "vocab": (str, {"choices": ("full", "corpus")}),
    "beam_size": (int, {"ge": 1}),
    "max_gen_len": (int, {"ge": 1}),
    "length_penalty": (float, {}),
    "fixed_temperature": (float, {"gt": 0}),
    "gather_features": (bool, {}),
    "hflip": (bool, {}),
}


class FieldError(Exception):
    """A problem at one dotted key; `build_recipe` turns it into a ConfigError naming the file."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


# -- value checks ----------------------------------------------------------------------------------

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})" if not isinstance(value, (int, float)) or isinstance(value, bool) else repr(value)


def suggest(word: str, allowed: typing.Iterable[str]) -> str:
    """ "; did you mean 'x'?" when a close match exists (difflib), else ""."""
    close = difflib.get_close_matches(str(word), [str(a) for a in allowed], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_rules(value: Any, key: str, rules: dict[str, Any]) -> None:
    choices = rules.get("choices")
    if choices is not None and value not in choices:
        raise FieldError(key, f"{value!r} is not allowed{suggest(value, choices)} (allowed: {', '.join(map(str, choices))})")
    bounds = [("gt", ">", lambda a, b: a > b), ("ge", ">=", lambda a, b: a >= b),
              ("lt", "<", lambda a, b: a < b), ("le", "<=", lambda a, b: a <= b)]
    for name, sign, ok in bounds:
        if name in rules and isinstance(value, (int, float)) and not ok(value, rules[name]):
            parts = [f"{s} {rules[n]}" for n, s, _ in bounds if n in rules]
            raise FieldError(key, f"must be {' and '.join(parts)}, got {value!r}")


def check_value(value: Any, tp: Any, key: str, rules: dict[str, Any] | None = None) -> Any:
    """Check (and lightly normalise) one value against a type hint and its rules.

    Normalisations: ints are accepted for floats; numeric strings such as "1e-3" are accepted for
    floats (PyYAML reads `1e-3` as a string, a classic trap); lists become tuples for tuple fields.
    """
    rules = rules or {}
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return check_value(value, inner[0], key, rules)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise FieldError(key, f"expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FieldError(key, f"expected an integer, got {_show(value)}")
        _check_rules(value, key, rules)
        return value
    if tp is float:
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise FieldError(key, f"expected a number, got {_show(value)}")
        value = float(value)
        _check_rules(value, key, rules)
        return value
    if tp is str:
        if not isinstance(value, str) or not value.strip():
            raise FieldError(key, f"expected a non-empty string, got {_show(value)}")
        _check_rules(value, key, rules)
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise FieldError(key, f"expected a list of {len(args)} values, got {_show(value)}")
        return tuple(check_value(v, a, f"{key}[{i}]", rules) for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise FieldError(key, f"expected a list, got {_show(value)}")
        return [check_value(v, args[0], f"{key}[{i}]", rules) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise FieldError(key, f"expected a mapping, got {_show(value)}")
        for k in value:
            if not isinstance(k, str):
                raise FieldError(f"{key}.{k}", "keys must be strings")
        return dict(value)
    raise TypeError(f"unsupported schema type {tp!r} at {key}")  # a bug in this module, not user input


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def unknown_key(key: str, name: Any, allowed: typing.Iterable[str]) -> FieldError:
    allowed = list(allowed)
    return FieldError(f"{key}.{name}" if key else str(name),
                      f"unknown key{suggest(name, allowed)} (allowed: {', '.join(allowed)})")


def build_section(cls: type, raw: Any, key: str) -> Any:
    """A section dataclass from a mapping: unknown keys, types and rules are checked."""
    if raw is None:
        raw = {}
    fields = _fields(cls)
    if not isinstance(raw, dict):
        raise FieldError(key, f"expected a mapping with keys {', '.join(fields)}, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        if name not in fields:
            raise unknown_key(key, name, fields)
        kwargs[name] = check_value(value, hints[name], f"{key}.{name}", dict(fields[name].metadata))
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise FieldError(f"{key}.{missing[0]}", "is required")
    return cls(**kwargs)


# -- tasks -------------------------------------------------------------------------------------------


def _catalog() -> Any:
    """The task catalog module, or None while it is not importable (then names need family + dataset)."""
    try:
        from uniperceiver.tasks import catalog
    except ImportError:
        return None
    return catalog


def canonical_task_name(name: str) -> str | None:
    """The catalog's name for `name` (aliases, case and '_' resolved as the catalog does), or None."""
    cat = _catalog()
    if cat is None or not isinstance(name, str):
        return None
    if hasattr(cat, "resolve_task"):
        try:
            return cat.resolve_task(name).name
        except ConfigError:
            return None
    aliases = getattr(cat, "ALIASES", {})
    name = aliases.get(name, name)
    return name if name in getattr(cat, "CATALOG", {}) else None


def known_families() -> tuple[str, ...]:
    cat = _catalog()
    extra = tuple(k for k in getattr(cat, "FAMILIES", {}) if k not in FAMILIES) if cat else ()
    return FAMILIES + extra


def _catalog_defaults(name: str) -> dict[str, Any]:
    """TaskConfig fields of a catalog task, as a plain dict (the recipe entry is laid on top)."""
    cat = _catalog()
    if hasattr(cat, "task_config"):
        return dataclasses.asdict(cat.task_config(name))
    spec = cat.CATALOG[name]
    out: dict[str, Any] = {"name": name, "family": spec.family, "dataset": spec.dataset, "options": {}}
    defaults = dict(getattr(spec, "defaults", None) or {})
    task_fields = _fields(TaskConfig)
    for k, v in defaults.items():
        if k == "options":
            out["options"].update(v)
        elif k in task_fields:
            out[k] = v
        else:
            out["options"][k] = v
    return out


def build_task(raw: Any, key: str) -> TaskConfig:
    """One `tasks:` entry: a catalog name (string or mapping) or a full custom entry."""
    if isinstance(raw, str):
        raw = {"name": raw}
    fields = _fields(TaskConfig)
    if not isinstance(raw, dict):
        raise FieldError(key, f"expected a task name or a mapping with keys {', '.join(fields)}, got {_show(raw)}")
    for name in raw:
        if name not in fields:
            raise unknown_key(key, name, fields)
    if "name" not in raw:
        raise FieldError(f"{key}.name", "is required (a catalog task, see `upctl tasks`, or your own name)")
    name = check_value(raw["name"], str, f"{key}.name")
    canonical = canonical_task_name(name)
    merged: dict[str, Any]
    if canonical is not None:
        merged = _catalog_defaults(canonical)
        merged["name"] = canonical
        if "family" in raw and raw["family"] != merged["family"]:
            raise FieldError(f"{key}.family", f"{raw['family']!r} contradicts catalog task {canonical!r}, "
                                              f"which is {merged['family']!r}; use another name for a custom task")
    else:
        missing = [k for k in ("family", "dataset") if k not in raw]
        if missing:
            cat = _catalog()
            hint = suggest(name, list(getattr(cat, "CATALOG", {}))) if cat else ""
            where = "not in the task catalog" if cat else "not checked against a catalog (catalog not importable)"
            raise FieldError(f"{key}.name", f"task {name!r} is {where}{hint}; use a catalog task (`upctl tasks`) "
                                            f"or give {' and '.join(missing)} explicitly")
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
    if merged["family"] not in known_families():
        fams = known_families()
        raise FieldError(f"{key}.family", f"{merged['family']!r} is not a task family{suggest(merged['family'], fams)} "
                                          f"(allowed: {', '.join(fams)})")
    for oname, value in options.items():
        if oname in OPTION_RULES:
            tp, rules = OPTION_RULES[oname]
            options[oname] = check_value(value, tp, f"{key}.options.{oname}", rules)
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
        raise FieldError("", f"a recipe must be a mapping with keys {', '.join(fields)}, got {_show(raw)}")
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
        raise FieldError("tasks", f"expected a non-empty list of tasks, got {_show(tasks_raw)}")
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
        raise FieldError("stages", f"expected a list of {{name, set}} mappings, got {_show(stages_raw)}")
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
