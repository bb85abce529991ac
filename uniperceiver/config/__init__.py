"""Recipes: the dataclass schema, YAML loading with checks and `--set` overrides, per-task recipes.

    from uniperceiver.config import load_recipe, expand_stages
    recipe = load_recipe("recipes/tiny.yaml", ["optim.lr=5e-4", "tasks.mini-digits.batch_size=4"])
    for stage_name, stage_recipe in expand_stages(recipe):
        ...
"""

from uniperceiver.config.loading import (
    STAGE_DEFAULTS,
    expand_stages,
    find_recipe_file,
    list_recipes,
    load_recipe,
    override_task_options,
    parse_assignment,
    parse_key_values,
    parse_overrides,
    recipe_for_task,
    recipe_from_dict,
    recipe_to_dict,
    recipes_dir,
    save_recipe,
)
from uniperceiver.config.schema import (
    FAMILIES,
    STAGES,
    EvalSection,
    ModelSection,
    OptimSection,
    Recipe,
    StageSection,
    TrainSection,
    TuneSection,
)
from uniperceiver.errors import ConfigError
from uniperceiver.tasks.options import TaskConfig

__all__ = [
    "FAMILIES",
    "STAGES",
    "STAGE_DEFAULTS",
    "ConfigError",
    "EvalSection",
    "ModelSection",
    "OptimSection",
    "Recipe",
    "StageSection",
    "TaskConfig",
    "TrainSection",
    "TuneSection",
    "expand_stages",
    "find_recipe_file",
    "list_recipes",
    "load_recipe",
    "override_task_options",
    "parse_assignment",
    "parse_key_values",
    "parse_overrides",
    "recipe_for_task",
    "recipe_from_dict",
    "recipe_to_dict",
    "recipes_dir",
    "save_recipe",
]
