"""The `upctl` Typer application: one subcommand per stage, all calling `uniperceiver`.

Start-up stays fast (`upctl --help` in well under a second): the command modules imported here
import only typer, rich and torch-free parts of the library at the top; the model, the tasks and
torch are imported inside the command bodies (tests/test_cli_fast.py checks it).
"""

from __future__ import annotations

import importlib

import typer

from uniperceiver import __version__
from upctl.common import UpctlCommand, UpctlGroup, set_debug

app = typer.Typer(
    name="upctl",
    help="Uni-Perceiver toolkit: prepare data, pre-train, prompt-tune, fine-tune and evaluate "
    "one shared model for text, images and video.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=UpctlGroup,  # usage errors as one line; flags without a `<bool>` placeholder in --help
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"upctl {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(
        False, "--debug", help="Show the full traceback of an error instead of one line (also: UPCTL_DEBUG=1)."
    ),
) -> None:
    """Uni-Perceiver toolkit.

    Examples:

      upctl prepare mini

      upctl pretrain recipes/tiny.yaml

      upctl zeroshot --task mini-digits

      upctl --debug validate my-recipe.yaml
    """
    set_debug(ctx, debug)


#: name -> (module, function) of every command. The command modules import the library inside
#: their bodies, so registering them here costs no torch import (`upctl --help` stays fast).
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("convert", "convert"),
    "prepare": ("prepare", "prepare"),
    "zeroshot": ("evaluate", "zeroshot"),
    "evaluate": ("evaluate", "evaluate"),
    "predict": ("evaluate", "predict"),
    "tasks": ("tasks", "tasks"),
    "validate": ("recipes", "validate"),
    "recipes": ("recipes", "recipes"),
    "pretrain": ("train", "pretrain"),
    "prompt-tune": ("train", "prompt_tune"),
    "finetune": ("train", "finetune"),
    "bench": ("bench", "bench"),
    "demo": ("demo", "demo"),
}

for _name, (_module, _function) in COMMANDS.items():
    app.command(_name, cls=UpctlCommand)(getattr(importlib.import_module(f"upctl.commands.{_module}"), _function))
