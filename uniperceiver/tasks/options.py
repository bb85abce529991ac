"""Typed task options: the base classes, the value checks behind them, and `TaskConfig`.

Why: a recipe's `tasks[i].options` is free YAML, but every key has one type, one default and one
check. Each family declares `Options`, a subclass of `TaskOptions` whose fields carry their default
and their rules (`opt(default, gt=..., choices=...)`), so the recipe schema, the catalog and the
family itself read the same definition: `Options.from_mapping(raw, "tasks[0].options")` checks
every key (unknown ones get a "did you mean"), normalises values (ints for floats, lists for
tuples) and returns the frozen dataclass; `to_dict()` gives the plain YAML mapping back.

Checks that need the model (a size that must be a multiple of the patch size, a length that must
fit the model's text positions) live in `check_model(model_cfg)`, run when the task is built.

The value checks (`check_value`, `FieldError`, `suggest`) are shared with the recipe schema
(uniperceiver/config/schema.py sits above this package and imports them). The families' classes
are in tasks/family_options.py. `TaskConfig`, one entry of a recipe's `tasks:` list, holds the
options as YAML data and converts them (`typed_options`); it lives here, not beside `Task`
(tasks/base.py, which re-exports it), because this module and family_options.py import no torch:
the recipe schema, the catalog and `upctl validate` / `upctl tasks` use them without the model.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, TypeVar

from uniperceiver.errors import ConfigError
from uniperceiver.modeling.model_config import ModelConfig

__all__ = ["FieldError", "TaskConfig", "TaskOptions", "TrainOptions", "check_value", "opt", "suggest", "unknown_key"]

T = TypeVar("T", bound="TaskOptions")
O = TypeVar("O", bound="TaskOptions")


class FieldError(ConfigError):
    """A problem at one dotted key (`tasks[0].options.vocab`); `message` says what was expected.

    A ConfigError, so one that escapes is still a one-line user error; the recipe loader prefixes
    the file name.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message

    def under(self, prefix: str) -> "FieldError":
        """The same problem with its key placed under `prefix` (`label_smoothing` -> `tasks[0].options.label_smoothing`)."""
        return FieldError(f"{prefix}.{self.key}" if self.key else prefix, self.message)


def opt(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None,
        parse: Callable[[Any, str], Any] | None = None, **rules: Any) -> Any:
    """A dataclass field with its checks: rules choices, gt, ge, le, lt; or `parse(value, key)` for
    values with a syntax of their own (e.g. views "4x3")."""
    meta = dict(rules)
    if parse is not None:
        meta["parse"] = parse
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# -- value checks ---------------------------------------------------------------------------------

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def show(value: Any) -> str:
    """A value as an error message shows it: numbers plainly, anything else with its type."""
    plain = isinstance(value, (int, float)) and not isinstance(value, bool)
    return repr(value) if plain else f"{value!r} ({type(value).__name__})"


def suggest(word: Any, allowed: Iterable[Any]) -> str:
    """ "; did you mean 'x'?" when a close match exists (difflib), else ""."""
    close = difflib.get_close_matches(str(word), [str(a) for a in allowed], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def unknown_key(key: str, name: Any, allowed: Iterable[str], what: str = "key") -> FieldError:
    """`key.name: unknown key; did you mean ...? (allowed: ...)`."""
    allowed = list(allowed)
    return FieldError(f"{key}.{name}" if key else str(name),
                      f"unknown {what}{suggest(name, allowed)} (allowed: {', '.join(allowed)})")


def _check_rules(value: Any, key: str, rules: Mapping[str, Any]) -> None:
    choices = rules.get("choices")
    if choices is not None and value not in choices:
        raise FieldError(key, f"{value!r} is not allowed{suggest(value, choices)} (allowed: {', '.join(map(str, choices))})")
    bounds = [("gt", ">", lambda a, b: a > b), ("ge", ">=", lambda a, b: a >= b),
              ("lt", "<", lambda a, b: a < b), ("le", "<=", lambda a, b: a <= b)]
    for name, _, ok in bounds:
        if name in rules and isinstance(value, (int, float)) and not ok(value, rules[name]):
            parts = [f"{s} {rules[n]}" for n, s, _ in bounds if n in rules]
            raise FieldError(key, f"must be {' and '.join(parts)}, got {value!r}")


def check_value(value: Any, tp: Any, key: str, rules: Mapping[str, Any] | None = None) -> Any:
    """Check (and lightly normalise) one value against a type hint and its rules.

    Normalisations: ints are accepted for floats; numeric strings such as "1e-3" are accepted for
    floats (PyYAML reads `1e-3` as a string, a classic trap); lists become tuples for tuple fields.
    A union tries its members in order (None first when allowed).
    """
    rules = rules or {}
    parse = rules.get("parse")
    if parse is not None:
        return None if value is None and _allows_none(tp) else parse(value, key)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors: list[FieldError] = []
        for member in (a for a in args if a is not type(None)):
            try:
                return check_value(value, member, key, rules)
            except FieldError as exc:
                errors.append(exc)
        raise errors[0]
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise FieldError(key, f"expected true or false, got {show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FieldError(key, f"expected an integer, got {show(value)}")
        _check_rules(value, key, rules)
        return value
    if tp is float:
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise FieldError(key, f"expected a number, got {show(value)}")
        value = float(value)
        _check_rules(value, key, rules)
        return value
    if tp is str:
        if not isinstance(value, str) or not value.strip():
            raise FieldError(key, f"expected a non-empty string, got {show(value)}")
        _check_rules(value, key, rules)
        return value
    if origin is tuple:
        return _check_tuple(value, args, key, rules)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise FieldError(key, f"expected a list, got {show(value)}")
        return [check_value(v, args[0], f"{key}[{i}]", rules) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise FieldError(key, f"expected a mapping, got {show(value)}")
        return {check_value(k, args[0], f"{key}.{k}"): check_value(v, args[1], f"{key}.{k}") for k, v in value.items()}
    raise TypeError(f"unsupported option type {tp!r} at {key}")  # a bug in a schema, not user input


def _check_tuple(value: Any, args: tuple, key: str, rules: Mapping[str, Any]) -> tuple:
    if len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, (list, tuple)) or not value:
            raise FieldError(key, f"expected a non-empty list, got {show(value)}")
        return tuple(check_value(v, args[0], f"{key}[{i}]", rules) for i, v in enumerate(value))
    if not isinstance(value, (list, tuple)) or len(value) != len(args):
        raise FieldError(key, f"expected a list of {len(args)} values, got {show(value)}")
    return tuple(check_value(v, a, f"{key}[{i}]", rules) for i, (v, a) in enumerate(zip(value, args)))


def _allows_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _plain(value: Any) -> Any:
    """YAML / JSON-able form: tuples become lists, mappings are copied."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# -- the options base classes ---------------------------------------------------------------------


@dataclass(frozen=True)
class TaskOptions:
    """Options every family has. Subclasses add fields (with `opt(...)` rules) and `check()`."""

    #: Batch size of evaluation; None = the task's batch_size.
    eval_batch_size: int | None = opt(None, gt=0)

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = check_value(getattr(self, f.name), hints[f.name], f.name, f.metadata)
            object.__setattr__(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Checks between fields (raise FieldError with the field's name as key)."""

    def check_model(self, model_cfg: ModelConfig) -> None:
        """Checks that need the model (sizes, positions, logit scales); run when the task is built."""

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls: type[T], raw: Mapping[str, Any] | None, where: str = "options") -> T:
        """The typed options of a YAML mapping; FieldError at `where.KEY` naming the value and what is allowed."""
        raw = {} if raw is None else raw
        if not isinstance(raw, Mapping):
            raise FieldError(where, f"expected a mapping of options ({', '.join(cls.keys())}), got {show(raw)}")
        allowed = cls.keys()
        for name in raw:
            if name not in allowed:
                raise unknown_key(where, name, allowed, what=f"option for {cls.__name__}")
        try:
            return cls(**raw)
        except FieldError as exc:
            raise exc.under(where) from None

    def to_dict(self) -> dict[str, Any]:
        """Every option as plain YAML data (tuples as lists); `from_mapping(to_dict())` gives it back."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def changed(self) -> dict[str, Any]:
        """Only the options that differ from the class defaults (what a catalog entry states)."""
        base = type(self)().to_dict()
        return {k: v for k, v in self.to_dict().items() if base[k] != v}


@dataclass(frozen=True)
class TrainOptions(TaskOptions):
    """Options of every trainable family."""

    #: Label smoothing of the cross entropy (timm / torch rule: on = 1 - s + s / C).
    label_smoothing: float = opt(0.0, ge=0, lt=1)


def check_max_len(value: int, model_cfg: ModelConfig, key: str = "max_len") -> None:
    """A token length must fit the model's text positions."""
    if value > model_cfg.max_text_len:
        raise FieldError(key, f"{key}={value} exceeds the model's {model_cfg.max_text_len} text positions")


def check_scale(value: str | None, model_cfg: ModelConfig, key: str = "scale") -> None:
    """A logit-scale (temperature) name must be one the model has."""
    if value is not None and value not in model_cfg.logit_scale_names:
        raise FieldError(key, f"{key}={value!r} is not a logit scale of the model{suggest(value, model_cfg.logit_scale_names)} "
                              f"(allowed: {', '.join(model_cfg.logit_scale_names)})")


# -- one entry of a recipe's tasks: list ----------------------------------------------------------


@dataclass
class TaskConfig:
    """One entry of a recipe's `tasks:` list (also what the catalog's defaults fill in)."""

    name: str
    family: str
    dataset: str
    split: str = "train"
    eval_split: str = "val"
    batch_size: int = 8
    sample_weight: float = 1.0
    loss_weight: float = 1.0
    #: The family's options as plain YAML data (its `Options` dataclass says which keys, types and
    #: defaults); recipes and the catalog store every option, resolved.
    options: dict[str, Any] = field(default_factory=dict)

    def typed_options(self, cls: type[O], model_cfg: ModelConfig | None = None) -> O:
        """`options` checked and converted to the family's `Options` dataclass (once, by the task).

        With `model_cfg`, the checks that need the model run too. Raises FieldError (a ConfigError)
        naming `task '<name>': options.<key>`, the value and what was expected.
        """
        where = f"task {self.name!r}: options"
        opts = cls.from_mapping(self.options, where)
        if model_cfg is not None:
            try:
                opts.check_model(model_cfg)
            except FieldError as exc:
                raise exc.under(where) from None
        return opts
