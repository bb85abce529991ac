"""`upctl tasks`: the catalog of named tasks, and the tasks of the user's prepared datasets, as tables (or JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

from upctl.common import fail_on_error, report_console, write_json

if TYPE_CHECKING:
    from rich.console import Console

    from uniperceiver.tasks.catalog import TaskSpec

_KINDS = ("downstream", "pretrain", "mini", "user")


def _options_text(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())


def tasks(
    family: Optional[str] = typer.Option(None, "--family", help="Only tasks of this family (image_cls, video_cls, "
                                         "retrieval, caption, mlm, vqa, glue)."),
    kind: Optional[str] = typer.Option(None, "--kind", help="Only 'downstream', 'pretrain', 'mini' or 'user' tasks "
                                       "(user: your datasets from `upctl prepare imagefolder|captions|textcls`)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Where to look for your prepared datasets "
                                            "(default: $UPCTL_DATA, else ./data)."),
    options: bool = typer.Option(False, "--options", help="Also show each task's default options."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Also write the (filtered) catalog as JSON to this file ('-': standard output)."),
) -> None:
    """List the task catalog: name, dataset, family, metric, held-out flag and default recipes.

    A task name (or an alias such as `msvd`, `vqa`, `coco`) is what `--task` and recipes take.
    Held-out tasks are kept out of pre-training to measure zero-shot generalisation. The tasks of
    your own prepared datasets (`upctl prepare imagefolder|captions|textcls --name NAME`) follow.

    Examples:

      upctl tasks

      upctl tasks --kind mini --options

      upctl tasks --family caption --json captioning-tasks.json

      upctl tasks --kind mini --json - | python -m json.tool

      upctl tasks --kind user --data-dir ~/upctl-data
    """
    from uniperceiver.data.format import resolve_data_dir
    from uniperceiver.errors import ConfigError
    from uniperceiver.tasks.catalog import ALIASES, CATALOG, FAMILIES, user_task_specs

    with fail_on_error():
        console = report_console(json_file)
        if family is not None and family not in FAMILIES:
            raise ConfigError(f"--family {family!r} is unknown; expected one of {', '.join(FAMILIES)}")
        if kind is not None and kind not in _KINDS:
            raise ConfigError(f"--kind {kind!r} is unknown; expected one of {', '.join(_KINDS)}")
        specs = [s for s in CATALOG.values() if (family is None or s.family == family) and (kind is None or s.kind == kind)]
        users = [s for s in user_task_specs(data_dir) if (family is None or s.family == family) and kind in (None, "user")]
        if kind != "user":
            _catalog_table(console, specs, options)
        if users or kind == "user":
            _user_table(console, users, resolve_data_dir(data_dir), options)
        if json_file is not None:
            write_json(json_file, {
                "tasks": [s.to_dict() for s in specs],
                "user_tasks": [s.to_dict() for s in users],
                "aliases": {a: t for a, t in ALIASES.items()},
                "families": dict(FAMILIES),
            })


def _catalog_table(console: Console, specs: list[TaskSpec], options: bool) -> None:
    """The catalog's tasks, then a line on recipes and the aliases of the listed tasks."""
    from uniperceiver.tasks.catalog import ALIASES

    table = Table(title=f"{len(specs)} tasks", title_justify="left")
    table.add_column("task", no_wrap=True)  # names are what users copy: never broken
    for col in ("dataset", "family", "metric", "held out", "recipes"):
        table.add_column(col, overflow="fold")
    if options:
        table.add_column("options", overflow="fold")
    for s in specs:
        recipes = [r for r, path in (("prompt", s.prompt_recipe), ("finetune", s.finetune_recipe)) if path]
        row = [s.name, s.dataset, s.family, s.metric, "yes" if s.held_out else "", ", ".join(recipes) or "-"]
        if options:
            row.append(_options_text(s.defaults.get("options", {})))
        table.add_row(*row)
    console.print(table)
    console.print("[dim]recipes: recipes/prompt/<task>.yaml (1% prompt tuning), recipes/finetune/<task>.yaml "
                  "(full fine-tuning); pre-training tasks are trained through pre-training recipes[/]",
                  highlight=False)
    aliases = [f"{a} -> {t}" for a, t in ALIASES.items() if t in {s.name for s in specs}]
    if aliases:
        console.print("[dim]aliases: " + ", ".join(aliases) + "[/]", highlight=False)


def _user_table(console: Console, specs: list[TaskSpec], data_dir: Path, options: bool) -> None:
    """The tasks of the user's prepared datasets (meta.json "user_tasks") under the data dir."""
    table = Table(title=f"{len(specs)} tasks of your prepared datasets under {data_dir}", title_justify="left")
    table.add_column("task", no_wrap=True)
    for col in ("dataset", "family", "metric", "train / eval split"):
        table.add_column(col, overflow="fold")
    table.add_column("options" if options else "description", overflow="fold")
    for s in specs:
        last = _options_text(s.defaults.get("options", {})) if options else s.description
        table.add_row(s.name, s.dataset, s.family, s.metric,
                      f"{s.defaults.get('split', 'train')} / {s.defaults.get('eval_split', 'val')}", last)
    console.print(table)
    if not specs:
        console.print("[dim]none yet: upctl prepare imagefolder|captions|textcls --root DIR --name NAME[/]",
                      highlight=False)
