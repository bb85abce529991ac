"""`upctl tasks`: the catalog of named tasks as a table (or JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from upctl.common import fail_on_error, report_console, write_json

_KINDS = ("downstream", "pretrain", "mini")


def _options_text(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())


def tasks(
    family: Optional[str] = typer.Option(None, "--family", help="Only tasks of this family (image_cls, video_cls, "
                                         "retrieval, caption, mlm, vqa, glue)."),
    kind: Optional[str] = typer.Option(None, "--kind", help="Only 'downstream', 'pretrain' or 'mini' tasks."),
    options: bool = typer.Option(False, "--options", help="Also show each task's default options."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Also write the (filtered) catalog as JSON to this file ('-': standard output)."),
) -> None:
    """List the task catalog: name, dataset, family, metric, held-out flag and default recipes.

    A task name (or an alias such as `msvd`, `vqa`, `coco`) is what `--task` and recipes take.
    Held-out tasks are kept out of pre-training to measure zero-shot generalisation.

    Examples:

      upctl tasks

      upctl tasks --kind mini --options

      upctl tasks --family caption --json captioning-tasks.json

      upctl tasks --kind mini --json - | python -m json.tool
    """
    from uniperceiver.errors import ConfigError
    from uniperceiver.tasks.catalog import ALIASES, CATALOG, FAMILIES

    with fail_on_error():
        console = report_console(json_file)
        if family is not None and family not in FAMILIES:
            raise ConfigError(f"--family {family!r} is unknown; expected one of {', '.join(FAMILIES)}")
        if kind is not None and kind not in _KINDS:
            raise ConfigError(f"--kind {kind!r} is unknown; expected one of {', '.join(_KINDS)}")
        specs = [s for s in CATALOG.values() if (family is None or s.family == family) and (kind is None or s.kind == kind)]
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
        if json_file is not None:
            write_json(json_file, {
                "tasks": [s.to_dict() for s in specs],
                "aliases": {a: t for a, t in ALIASES.items()},
                "families": dict(FAMILIES),
            })
