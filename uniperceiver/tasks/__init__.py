"""Task families (one module each) and the catalog of named tasks.

`resolve_task("coco")` -> the catalog entry, `task_config(name, **overrides)` -> a TaskConfig,
`build_task(cfg, data_dir, model_cfg, tokenizer)` -> the family's Task on its prepared dataset.
Each family declares its typed options (`Task.Options`, a `TaskOptions` dataclass); family modules
are imported when a task's options are resolved or the task is built.
"""

from uniperceiver.tasks.base import TargetSet, Task, TaskConfig, encode_targets, text_target_set, vocab_target_set
from uniperceiver.tasks.catalog import ALIASES, CATALOG, FAMILIES, TaskSpec, build_task, resolve_task, task_config
from uniperceiver.tasks.options import TaskOptions

__all__ = [
    "ALIASES", "CATALOG", "FAMILIES", "TargetSet", "Task", "TaskConfig", "TaskOptions", "TaskSpec", "build_task", "encode_targets",
    "resolve_task", "task_config", "text_target_set", "vocab_target_set",
]
