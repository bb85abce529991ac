"""The `upctl` Typer application: one subcommand per stage, all calling `uniperceiver`.

Start-up stays fast (`upctl --help` in well under a second): the command modules imported here
import only typer, rich and torch-free parts of the library at the top; the model, the tasks and
torch are imported inside the command bodies (tests/test_cli_fast.py checks it).
"""

from __future__ import annotations

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


from upctl.commands.convert import convert  # noqa: E402

app.command("convert", cls=UpctlCommand)(convert)

from upctl.commands.prepare import prepare  # noqa: E402

app.command("prepare", cls=UpctlCommand)(prepare)

from upctl.commands.evaluate import evaluate, predict, zeroshot  # noqa: E402

app.command("zeroshot", cls=UpctlCommand)(zeroshot)
app.command("evaluate", cls=UpctlCommand)(evaluate)
app.command("predict", cls=UpctlCommand)(predict)

from upctl.commands.tasks import tasks  # noqa: E402

app.command("tasks", cls=UpctlCommand)(tasks)

from upctl.commands.recipes import recipes, validate  # noqa: E402

app.command("validate", cls=UpctlCommand)(validate)
app.command("recipes", cls=UpctlCommand)(recipes)

from upctl.commands.train import finetune, pretrain, prompt_tune  # noqa: E402

app.command("pretrain", cls=UpctlCommand)(pretrain)
app.command("prompt-tune", cls=UpctlCommand)(prompt_tune)
app.command("finetune", cls=UpctlCommand)(finetune)

from upctl.commands.bench import bench  # noqa: E402

app.command("bench", cls=UpctlCommand)(bench)

from upctl.commands.demo import demo  # noqa: E402

app.command("demo", cls=UpctlCommand)(demo)
