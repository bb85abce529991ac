"""`upctl validate RECIPE.yaml` and `upctl recipes`: check a recipe, list the shipped ones."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.table import Table

from uniperceiver.errors import ConfigError, UpctlError
from upctl.common import console, err_console, fail_on_error, report_console, write_json

if TYPE_CHECKING:  # the recipe schema is imported when a command runs, not for `--help`
    from uniperceiver.config import Recipe


def _g(x: float) -> str:
    return f"{x:g}"


def _overrides(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "-"


def _summary(recipe: Recipe, source: str, out: Console) -> None:
    """What the recipe resolves to: model, optimiser, loop, tuning, the task mixture and the stages.

    A task's options column lists only those that differ from its family's defaults (a resolved
    TaskConfig holds every option).
    """
    from uniperceiver.tasks.catalog import changed_options

    m, o, t, tu = recipe.model, recipe.optim, recipe.train, recipe.tune
    out.print(f"[bold]{recipe.name}[/] ({recipe.stage})  {source}", highlight=False)
    if recipe.description:
        out.print(f"  {recipe.description}", highlight=False)
    clip = "off" if not o.clip_grad else _g(o.clip_grad)
    lines = [
        ("model", f"{m.size}  overrides: {_overrides(m.overrides)}  checkpoint: {m.checkpoint or '-'}"),
        ("optim", f"AdamW lr {_g(o.lr)} betas ({_g(o.betas[0])}, {_g(o.betas[1])}) eps {_g(o.eps)} "
                  f"wd {_g(o.weight_decay)} clip {clip}; {o.warmup_steps} warm-up steps, {o.schedule} to {_g(o.min_lr)}"
                  + (f", layer decay {_g(o.layer_decay)}" if o.layer_decay else "")),
        ("train", f"{t.max_steps:,} steps x{t.grad_accum} accum, precision {t.precision}, seed {t.seed}, "
                  f"eval every {t.eval_every or '-'}, checkpoint every {t.ckpt_every or '-'} (keep {t.keep_checkpoints})"),
        ("tune", f"{tu.mode}" + (f", {tu.prompt_tokens} prompt tokens" if tu.mode == "prompt" else "")
                 + (f", {_g(tu.fraction * 100)}% of the data (seed {tu.fraction_seed})" if tu.fraction else ", all data")),
        ("eval", f"split {recipe.eval.split}, limit {recipe.eval.limit or '-'}"),
    ]
    if recipe.data_dir:
        lines.append(("data", recipe.data_dir))
    for key, text in lines:
        out.print(f"  [cyan]{key:<6}[/] {text}", highlight=False)
    total = sum(task.sample_weight for task in recipe.tasks)
    table = Table(title=f"tasks ({len(recipe.tasks)})", title_justify="left")
    for col, justify in (("task", "left"), ("family", "left"), ("dataset", "left"), ("batch", "right"),
                         ("drawn", "right"), ("loss w", "right"), ("options", "left")):
        table.add_column(col, justify=justify, overflow="fold")
    for task in recipe.tasks:
        table.add_row(task.name, task.family, task.dataset, str(task.batch_size),
                      f"{100 * task.sample_weight / total:.1f}%", _g(task.loss_weight),
                      _overrides(changed_options(task.family, task.options)))
    out.print(table)
    for st in recipe.stages:
        out.print(f"  [cyan]stage[/]  {st.name}: {len(st.set)} override(s)"
                  + (f" ({_overrides(st.set)})" if st.set else ""), highlight=False, soft_wrap=True)


def validate(
    recipe: str = typer.Argument(..., help="Recipe file, or a shipped recipe name such as tiny or mini/pretrain."),
    set_: Optional[list[str]] = typer.Option(
        None, "--set", help="Override KEY=VALUE (YAML value), repeatable; tasks by index or name: tasks.0.batch_size=4."
    ),
    show_yaml: bool = typer.Option(False, "--yaml", help="Also print the fully resolved recipe as YAML."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Write the resolved recipe as JSON to this file ('-': standard output)."),
) -> None:
    """Check a recipe (types, allowed values, task names, every stage) and print what it resolves to.

    A problem is one line naming the file, the key and what is allowed, with exit code 1.

    Examples:

      upctl validate recipes/tiny.yaml

      upctl validate recipes/base.yaml --set optim.lr=5e-4 --set tasks.imagenet21k.batch_size=256

      upctl validate mini/pretrain --set tasks.0.batch_size=8 --yaml

      upctl validate recipes/prompt/imagenet.yaml --json resolved.json
    """
    with fail_on_error():
        import yaml

        from uniperceiver.config import load_recipe, recipe_to_dict

        out = report_console(json_file)
        resolved = load_recipe(recipe, set_ or [])
        _summary(resolved, recipe, out)
        if show_yaml:
            out.print(yaml.safe_dump(recipe_to_dict(resolved), sort_keys=False, default_flow_style=None,
                                     width=100), highlight=False, markup=False)
        if json_file is not None:
            write_json(json_file, recipe_to_dict(resolved))
        out.print("[green]valid[/]")


def recipes(
    stage: Optional[str] = typer.Option(None, "--stage", help="Only recipes of this stage: pretrain, prompt_tune, finetune."),
    directory: Optional[Path] = typer.Option(None, "--dir", help="Recipe folder (default: the shipped recipes/)."),
) -> None:
    """List the shipped recipes with their stage, model size and task count.

    Every recipe is loaded and checked; a broken one is listed with its error and the exit code is 1.

    Examples:

      upctl recipes

      upctl recipes --stage finetune

      upctl validate recipes/tiny.yaml
    """
    with fail_on_error():
        from uniperceiver.config import STAGES, list_recipes, load_recipe, recipes_dir

        if stage is not None and stage not in STAGES:
            raise ConfigError(f"--stage {stage!r}: allowed: {', '.join(STAGES)}")
        root = directory if directory is not None else recipes_dir()
        if not root.is_dir():
            raise UpctlError(f"recipe folder not found: {root}")
        table = Table(title=f"recipes in {root}", title_justify="left")
        for col in ("recipe", "stage", "model", "tasks", "steps", "stages", "description"):
            table.add_column(col, overflow="fold", justify="right" if col in ("tasks", "steps") else "left")
        failed = 0
        for path in list_recipes(root):
            rel = str(path.relative_to(root))
            try:
                r = load_recipe(path)
            except UpctlError as exc:
                failed += 1
                table.add_row(rel, "[red]error[/]", "", "", "", "", str(exc))
                continue
            if stage is not None and r.stage != stage:
                continue
            table.add_row(rel, r.stage, r.model.size, str(len(r.tasks)), f"{r.train.max_steps:,}",
                          ", ".join(s.name for s in r.stages) or "-", r.description)
        console.print(table)
    if failed:
        err_console.print(f"[bold red]error:[/] {failed} recipe(s) in {root} failed to load", highlight=False)
        raise typer.Exit(1)
