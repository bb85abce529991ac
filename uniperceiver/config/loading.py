"""Reading, overriding, expanding and writing recipes.

- YAML is read with `yaml.safe_load` only: tags such as `!!python/object/apply` (the reference
  configs used one to `eval` a string) are refused, never executed. Duplicate keys, which plain
  PyYAML silently resolves to the last value, are reported with their line.
- `--set a.b=c` overrides edit the mapping before it is checked, so an override is checked exactly
  like the file. Values are parsed as YAML (`0.1`, `true`, `[0.9, 0.99]`, `null`). Tasks and stages
  are addressed by index or by name: `tasks.0.batch_size=4`, `tasks.mini-digits.batch_size=4`.
- Errors are `ConfigError`s of one line: `<file>: <dotted key>: <problem> (allowed: ...)`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from uniperceiver.config.schema import (
    SECTIONS,
    FieldError,
    Recipe,
    StageSection,
    _fields,
    build_recipe,
    canonical_task_name,
    suggest,
    unknown_key,
)
from uniperceiver.errors import ConfigError
from uniperceiver.tasks import catalog
from uniperceiver.tasks.catalog import TaskSpec
from uniperceiver.tasks.options import TaskConfig
from uniperceiver.utils.files import atomic_write_text

_STAGE_ALIASES = {"prompt": "prompt_tune", "prompt-tune": "prompt_tune", "prompt_tune": "prompt_tune",
                  "finetune": "finetune", "fine-tune": "finetune", "fine_tune": "finetune"}
_STAGE_DIRS = {"prompt_tune": "prompt", "finetune": "finetune"}


# -- where recipes live ------------------------------------------------------------------------------


def recipes_dir() -> Path:
    """The shipped recipes folder: $UPCTL_RECIPES, else the package's `recipes/`, else ./recipes.

    `uniperceiver/recipes` is package data in an installed wheel and, in a checkout, a link to the
    top-level `recipes/`, so one path serves both.
    """
    env = os.environ.get("UPCTL_RECIPES")
    if env:
        return Path(env)
    shipped = Path(__file__).resolve().parents[1] / "recipes"
    return shipped if shipped.is_dir() else Path.cwd() / "recipes"


def list_recipes(root: str | Path | None = None) -> list[Path]:
    """Every *.yaml / *.yml recipe under `root` (default: `recipes_dir()`), sorted."""
    base = Path(root) if root is not None else recipes_dir()
    return sorted(p for p in base.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def find_recipe_file(path: str | Path) -> Path:
    """`path` itself, or a shipped recipe named like `tiny` / `mini/pretrain` / `prompt/imagenet.yaml`."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_absolute():
        root = recipes_dir()
        for cand in (root / p, root / f"{p}.yaml", root.parent / p):
            if cand.is_file():
                return cand
    shipped = ", ".join(str(q.relative_to(recipes_dir())) for q in list_recipes()[:8]) if recipes_dir().is_dir() else ""
    more = f" (shipped recipes include: {shipped}, ...; see `upctl recipes`)" if shipped else ""
    raise ConfigError(f"recipe file not found: {path}{more}")


# -- YAML ----------------------------------------------------------------------------------------------


def _check_duplicate_keys(node: yaml.Node | None, label: str) -> None:
    """Duplicate mapping keys are an error (PyYAML would keep the last one silently)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                line = key_node.start_mark.line + 1
                if key_node.value in seen:
                    raise ConfigError(f"{label}: line {line}: duplicate key {key_node.value!r} "
                                      f"(first at line {seen[key_node.value]})")
                seen[key_node.value] = line
            _check_duplicate_keys(value_node, label)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicate_keys(item, label)


def parse_yaml(text: str, label: str) -> Any:
    """Plain YAML only (safe_load); any problem becomes a one-line ConfigError with its line."""
    try:
        _check_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), label)
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else "?"
        raise ConfigError(f"{label}: line {line}: {exc.problem}; recipes are plain YAML (mappings, lists, "
                          "strings, numbers, booleans) and tags such as !!python/... are refused") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{label}: invalid YAML at {where}: {problem}") from None


def read_yaml(path: str | Path) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"recipe file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the recipe ({exc.__class__.__name__}: {exc})") from None
    return parse_yaml(text, str(path))


# -- overrides -------------------------------------------------------------------------------------------


# One syntax for every `KEY=VALUE` flag of the command line (`--set` of recipes and of task options,
# `--option` of preparers): split at the first '=', key stripped and non-empty, each key once.
# `parse_key_values` keeps the values as text (preparers check their own); `parse_overrides` reads
# them as YAML (`0.1`, `true`, `[4, 3]`, an empty value = null), as recipes are.

#: flag -> (how its help spells the form, an example).
_FORMS = {"--set": ("KEY=VALUE", "optim.lr=1e-4 or tasks.0.batch_size=8"), "--option": ("key=value", "check=verify")}


def _split_pair(text: str, what: str) -> tuple[str, str]:
    key, sep, value = str(text).partition("=")
    key = key.strip()
    if not sep or not key:
        form, example = _FORMS.get(what, ("key=value", "name=value"))
        raise ConfigError(f"{what} {text!r}: expected {form} (e.g. {what} {example})")
    return key, value


def parse_key_values(pairs: Sequence[str] | None, what: str = "--option") -> dict[str, str]:
    """`["k=v", ...]` -> {k: "v"} (values as text, stripped); a pair without '=' or a key given twice
    is a one-line ConfigError naming the flag `what`."""
    out: dict[str, str] = {}
    for pair in [pairs] if isinstance(pairs, str) else pairs or []:
        key, value = _split_pair(pair, what)
        if key in out:
            raise ConfigError(f"{what} {pair!r}: {key!r} is given twice ({what} {key}={out[key]} first)")
        out[key] = value.strip()
    return out


def parse_value(text: str, label: str) -> Any:
    """The YAML value of one override (`0.1`, `true`, `[0.9, 0.99]`); an empty text means null."""
    return None if not text.strip() else parse_yaml(text, label)


def parse_assignment(text: str, what: str = "--set") -> tuple[str, Any]:
    """`a.b=c` -> ("a.b", YAML value of c). An empty value means null."""
    key, value = _split_pair(text, what)
    return key, parse_value(value, f"{what} {text}")


def parse_overrides(pairs: Sequence[str] | None, what: str = "--set") -> dict[str, Any]:
    """`["k=v", ...]` -> {k: YAML value of v}, with the checks of `parse_key_values`."""
    raw = parse_key_values(pairs, what)
    return {key: parse_value(value, f"{what} {key}={value}") for key, value in raw.items()}


def override_task_options(cfg: TaskConfig, pairs: Sequence[str] | None, what: str = "--set") -> TaskConfig:
    """A copy of `cfg` with `KEY=VALUE` task options applied, checked by the family's typed `Options`
    (an unknown key gets a "did you mean"; a bad value names the key and what is allowed)."""
    changes = parse_overrides(pairs, what)
    options = catalog.resolved_options(cfg.family, {**cfg.options, **changes}, f"{what}: task {cfg.name!r}: options")
    return dataclasses.replace(cfg, options=options)


def _set_free(node: dict, tokens: list[str], value: Any, key: str) -> None:
    """Set inside a free-form mapping (model.overrides, task options), creating levels as needed."""
    for i, tok in enumerate(tokens[:-1]):
        nxt = node.setdefault(tok, {})
        if not isinstance(nxt, dict):
            raise FieldError(f"{key}.{'.'.join(tokens[:i + 1])}", f"is a value ({nxt!r}), not a mapping")
        node = nxt
    node[tokens[-1]] = value


def _item_matches(item: Any, token: str) -> bool:
    name = item if isinstance(item, str) else item.get("name") if isinstance(item, dict) else None
    if not isinstance(name, str):
        return False
    if name == token:
        return True
    canon = canonical_task_name(name)
    return canon is not None and canon == canonical_task_name(token)


def _find_item(items: Any, token: str, key: str) -> int:
    if not isinstance(items, list) or not items:
        raise FieldError(key, "is empty: nothing to address")
    if token.lstrip("-").isdigit():
        idx = int(token)
        if not 0 <= idx < len(items):
            raise FieldError(f"{key}.{token}", f"index out of range (allowed: 0..{len(items) - 1})")
        return idx
    for idx, item in enumerate(items):
        if _item_matches(item, token):
            return idx
    names = [it if isinstance(it, str) else str(it.get("name")) for it in items if isinstance(it, (str, dict))]
    raise FieldError(f"{key}.{token}", f"no entry named {token!r}{suggest(token, names)} "
                                       f"(address by index 0..{len(items) - 1} or by name: {', '.join(names)})")


def set_path(raw: dict, dotted: str, value: Any) -> str:
    """Assign `value` at `dotted` in a raw recipe mapping; returns the display key (tasks[2].batch_size).

    Only keys of the schema are accepted (unknown ones raise FieldError with a close match); below
    the mappings model.overrides, tasks[i].options and stages[i].set any key goes here, and is
    checked when the recipe is built (model fields, the family's typed options, a stage's recipe).
    """
    tokens = dotted.split(".")
    if any(not t for t in tokens):
        raise FieldError(dotted, "empty key part (use dots between keys, e.g. optim.lr)")
    top, rest = tokens[0], tokens[1:]
    top_fields = _fields(Recipe)
    if top not in top_fields:
        raise unknown_key("", top, top_fields)
    if not rest:
        raw[top] = value
        return top
    if top in SECTIONS:
        cls = SECTIONS[top]
        sec = raw.get(top)
        if sec is None:
            sec = raw[top] = {}
        if not isinstance(sec, dict):
            raise FieldError(top, f"is not a mapping ({sec!r})")
        fields = _fields(cls)
        if rest[0] not in fields:
            raise unknown_key(top, rest[0], fields)
        if len(rest) == 1:
            sec[rest[0]] = value
        elif rest[0] == "overrides":
            sub = sec.setdefault("overrides", {})
            if not isinstance(sub, dict):
                raise FieldError(f"{top}.overrides", "is not a mapping")
            _set_free(sub, rest[1:], value, f"{top}.overrides")
        else:
            raise FieldError(f"{top}.{rest[0]}", f"is a single value; it has no key {rest[1]!r}")
        return f"{top}.{'.'.join(rest)}"
    if top in ("tasks", "stages"):
        items = raw.get(top)
        idx = _find_item(items, rest[0], top)
        item = items[idx]
        if isinstance(item, str):
            item = items[idx] = {"name": item}
        if not isinstance(item, dict):
            raise FieldError(f"{top}[{idx}]", f"is not a mapping ({item!r})")
        shown = f"{top}[{idx}]"
        if len(rest) == 1:
            items[idx] = value
            return shown
        fields = _fields(TaskConfig if top == "tasks" else StageSection)
        if rest[1] not in fields:
            raise unknown_key(shown, rest[1], fields)
        if len(rest) == 2:
            item[rest[1]] = value
        elif rest[1] == "options":
            sub = item.setdefault("options", {})
            if not isinstance(sub, dict):
                raise FieldError(f"{shown}.options", "is not a mapping")
            _set_free(sub, rest[2:], value, f"{shown}.options")
        elif rest[1] == "set":
            sub = item.setdefault("set", {})
            if not isinstance(sub, dict):
                raise FieldError(f"{shown}.set", "is not a mapping")
            sub[".".join(rest[2:])] = value  # stage overrides are dotted keys themselves
        else:
            raise FieldError(f"{shown}.{rest[1]}", f"is a single value; it has no key {rest[2]!r}")
        return f"{shown}.{'.'.join(rest[1:])}"
    raise FieldError(top, f"is a single value; it has no key {rest[0]!r}")


def _apply(raw: dict, assignments: Iterable[tuple[str, Any, str]], label: str) -> dict[str, str]:
    """Apply (key, value, origin) assignments; returns display key -> origin for later error messages."""
    origins: dict[str, str] = {}
    for key, value, origin in assignments:
        try:
            origins[set_path(raw, key, value)] = origin
        except FieldError as exc:
            raise ConfigError(f"{label}: {origin}: {exc}") from None
    return origins


def _message(label: str, exc: FieldError, origins: dict[str, str]) -> str:
    msg = f"{label}: {exc}"
    for shown, origin in origins.items():
        if exc.key == shown or exc.key.startswith((shown + ".", shown + "[")):
            return f"{msg} (from {origin})"
    return msg


def _overrides(overrides: Sequence[str]) -> list[tuple[str, Any, str]]:
    if isinstance(overrides, str):
        overrides = [overrides]
    return [(*parse_assignment(text), f"--set {text}") for text in overrides]


# -- building ------------------------------------------------------------------------------------------------


def _build(raw: Any, label: str, overrides: Sequence[str] = (), default_name: str = "recipe",
           extra: Sequence[tuple[str, Any, str]] = ()) -> Recipe:
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: a recipe must be a mapping of sections (name, stage, model, tasks, ...), "
                          f"got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    origins = _apply(raw, [*extra, *_overrides(overrides)], label)
    try:
        recipe = build_recipe(raw, default_name)
    except FieldError as exc:
        raise ConfigError(_message(label, exc, origins)) from None
    base = {k: v for k, v in raw.items() if k != "stages"}
    for i, stage in enumerate(recipe.stages):  # every stage must be a valid recipe too
        _stage_recipe(base, stage, i, overrides, label)
    return recipe


def _stage_recipe(base: dict, stage: StageSection, index: int, overrides: Sequence[str], label: str) -> Recipe:
    """The stage's `set` on top of the recipe, then the user's overrides again (those about stages aside)."""
    sets = [(k, v, f"stages[{index}].set[{k!r}]") for k, v in stage.set.items()]
    mine = [o for o in ([overrides] if isinstance(overrides, str) else overrides)
            if not o.partition("=")[0].strip().startswith("stages")]
    return _build(base, f"{label}: stage {stage.name!r}", mine, extra=sets)


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override (`--set` strings) and check a recipe file. Raises ConfigError."""
    found = find_recipe_file(path)
    return _build(read_yaml(found), str(path), overrides, default_name=found.stem)


def recipe_from_dict(data: dict[str, Any], overrides: Sequence[str] = (), label: str = "<recipe>") -> Recipe:
    """Check a plain mapping (e.g. a run's saved recipe) like a file."""
    return _build(data, label, overrides)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain YAML/JSON-able data; `recipe_from_dict(recipe_to_dict(r)) == r`."""

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(recipe))


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe as YAML, atomically (a run saves exactly what it trained with)."""
    text = yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=None, allow_unicode=True, width=100)
    atomic_write_text(Path(path), f"# resolved recipe {recipe.name!r} written by upctl\n{text}")


def expand_stages(recipe: Recipe, overrides: Sequence[str] = ()) -> list[tuple[str, Recipe]]:
    """The recipe of every stage in order: [(stage name, recipe with its `set` applied, stages empty)].

    `overrides` (the user's --set) are applied again after each stage's `set`, so they win.
    Without stages: [(recipe.stage, recipe)].
    """
    if not recipe.stages:
        return [(recipe.stage, recipe)]
    base = recipe_to_dict(recipe)
    base.pop("stages")
    return [(st.name, _stage_recipe(base, st, i, overrides, recipe.name)) for i, st in enumerate(recipe.stages)]


# -- per-task recipes ------------------------------------------------------------------------------------------

#: What a downstream recipe defaults to when no recipe is shipped for the task (reference-style values).
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "prompt_tune": {
        "model": {"size": "base", "overrides": {"image_size": 224, "drop_path": 0.0, "spe_bias": True}},
        "optim": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-6, "weight_decay": 0.0, "clip_grad": 0.1,
                  "warmup_steps": 100, "min_lr": 1e-6, "schedule": "cosine"},
        "train": {"max_steps": 1000, "eval_every": 200, "ckpt_every": 1000},
        "tune": {"mode": "prompt", "prompt_tokens": 10, "fraction": 0.01},
    },
    "finetune": {
        "model": {"size": "base", "overrides": {"image_size": 224, "drop_path": 0.1}},
        "optim": {"lr": 2e-5, "betas": [0.9, 0.95], "eps": 1e-6, "weight_decay": 1e-4, "clip_grad": 0.1,
                  "warmup_steps": 500, "min_lr": 1e-6, "schedule": "cosine"},
        "train": {"max_steps": 10000, "eval_every": 500, "ckpt_every": 5000},
        "tune": {"mode": "full"},
    },
}


def _shipped_candidates(spec: TaskSpec, stage: str) -> list[Path]:
    root = recipes_dir()
    cands: list[Path] = []
    named = spec.prompt_recipe if stage == "prompt_tune" else spec.finetune_recipe
    if named:
        cands += [Path(named), root / named, root.parent / named]
    cands.append(root / _STAGE_DIRS[stage] / f"{spec.name}.yaml")
    return cands


def recipe_for_task(task_name: str, stage: str, overrides: Sequence[str] = (), data_dir: str | Path | None = None) -> Recipe:
    """The prompt-tune or fine-tune recipe of one task.

    Order: the shipped recipe (the catalog's `prompt_recipe` / `finetune_recipe`, else
    recipes/prompt|finetune/<task>.yaml); for `mini-*` tasks the recipes/mini/<stage>.yaml template
    with its task replaced; else STAGE_DEFAULTS plus the catalog's task defaults.
    """
    if stage not in _STAGE_ALIASES:
        raise ConfigError(f"stage {stage!r} has no per-task recipes{suggest(stage, _STAGE_ALIASES)} "
                          "(allowed: prompt_tune, finetune)")
    stage = _STAGE_ALIASES[stage]
    try:
        spec = catalog.resolve_task(task_name, data_dir)  # a user's prepared dataset when not in the catalog
    except ConfigError:
        known = sorted(catalog.CATALOG)
        raise ConfigError(f"unknown task {task_name!r}{suggest(task_name, known)}; known tasks: {', '.join(known)}") from None
    canonical = spec.name
    for cand in _shipped_candidates(spec, stage):
        if cand.is_file():
            recipe = load_recipe(cand, overrides)
            if recipe.stage != stage:
                raise ConfigError(f"{cand}: stage: {recipe.stage!r}, but it is the {stage} recipe of {canonical!r}")
            return recipe
    sub = _STAGE_DIRS[stage]
    dataset = spec.dataset
    template = recipes_dir() / "mini" / f"{sub}.yaml"
    if dataset.startswith("mini") and template.is_file():
        raw = read_yaml(template)
        if not isinstance(raw, dict):
            raise ConfigError(f"{template}: a recipe must be a mapping")
        first = (raw.get("tasks") or [{}])[0]
        entry: dict[str, Any] = {"name": canonical}
        if isinstance(first, dict) and "batch_size" in first:
            entry["batch_size"] = first["batch_size"]
        raw.update(name=f"{sub}-{canonical}", tasks=[entry],
                   description=f"{stage} of {canonical} (from the {template.name} template)")
        return _build(raw, f"{template} (template for {canonical})", overrides)
    raw = copy.deepcopy(STAGE_DEFAULTS[stage])
    entry = {"name": canonical}
    if spec.kind == "user":
        # Written out whole, so the recipe (and the run's saved copy) loads without the data dir; and no
        # reference resolution applies to a user's data: the checkpoint's own image size is kept.
        entry = dataclasses.asdict(catalog.task_config(canonical, data_dir=data_dir))
        raw["model"]["overrides"].pop("image_size", None)
    raw.update(name=f"{sub}-{canonical}", stage=stage, tasks=[entry],
               description=f"{stage} of {canonical} (default hyper-parameters; no recipe shipped)")
    return _build(raw, f"<default {stage} recipe for {canonical}>", overrides)
