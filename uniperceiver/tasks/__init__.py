"""Task families (one module each) and the catalog of named tasks.

`resolve_task("coco")` -> the catalog entry, `task_config(name, **overrides)` -> a TaskConfig,
`build_task(cfg, data_dir, model_cfg, tokenizer)` -> the family's Task on its prepared dataset.
Each family declares its typed options (`Task.Options`, a `TaskOptions` dataclass of
tasks/family_options.py); family modules are imported when a task is built.

Names load on first use (PEP 562): the catalog, `TaskConfig` and the options import no torch, so
`upctl tasks` / `upctl validate` start fast; `Task`, `TargetSet` and the target-set helpers
(tasks/base.py) import torch when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TargetSet": "base", "Task": "base", "encode_targets": "base", "text_target_set": "base",
    "vocab_target_set": "base",
    "TaskConfig": "options", "TaskOptions": "options",
    "ALIASES": "catalog", "CATALOG": "catalog", "FAMILIES": "catalog", "TaskSpec": "catalog",
    "build_task": "catalog", "resolve_task": "catalog", "task_config": "catalog",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)


__all__ = [
    "ALIASES", "CATALOG", "FAMILIES", "TargetSet", "Task", "TaskConfig", "TaskOptions", "TaskSpec", "build_task", "encode_targets",
    "resolve_task", "task_config", "text_target_set", "vocab_target_set",
]
