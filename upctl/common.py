"""What every command shares: one-line errors, the rich consoles, progress bars, `--json`.

Kept cheap to import: `upctl --help` loads every command module, so nothing here (or at the top
of a command module) may import torch or the model code; commands import the library inside
their bodies.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import typer
import typer.core
from rich.console import Console
from rich.markup import escape

from uniperceiver.errors import UpctlError
from uniperceiver.utils.progress import Progress

console = Console(stderr=False)
err_console = Console(stderr=True)

#: `--json -` writes the record to standard output instead of a file.
STDOUT = "-"

#: The global `--debug` flag of the invocation in progress (set by the app's callback, reset when
#: the invocation's context closes, so in-process runs such as tests never leak it to the next).
_DEBUG: contextvars.ContextVar[bool] = contextvars.ContextVar("upctl_debug", default=False)


def set_debug(ctx: typer.Context, enabled: bool) -> None:
    """Record `upctl --debug` for this invocation only."""
    token = _DEBUG.set(enabled)
    ctx.call_on_close(lambda: _DEBUG.reset(token))


def debug_enabled() -> bool:
    """Tracebacks instead of one line: the global `upctl --debug` flag, or UPCTL_DEBUG=1 in the environment."""
    return _DEBUG.get() or os.environ.get("UPCTL_DEBUG", "") not in ("", "0")


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """`warnings.showwarning` for a command: the message alone, one yellow line on stderr."""
    err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Warnings the library raises (a damaged shard, a checkpoint that fell back) as one line each,
    without the file:line and source line Python adds; with --debug, Python's own format. Scoped
    by `warnings.catch_warnings`, which puts the previous `showwarning` back."""
    if debug_enabled():
        yield
        return
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        yield


@contextlib.contextmanager
def fail_on_error() -> Iterator[None]:
    """Turn an expected error into one red line and exit code 1 (a traceback only with --debug);
    warnings meanwhile are one line each (`one_line_warnings`)."""
    try:
        with one_line_warnings():
            yield
    except UpctlError as exc:
        if debug_enabled():
            raise
        # escape(): messages carry paths and sample lists in brackets, which are not rich markup.
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except OSError as exc:
        # A full disk or an I/O error that no library layer named: still one line, never a traceback.
        if debug_enabled():
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        err_console.print(f"[bold red]error:[/] {escape(where + (exc.strerror or str(exc)))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        raise typer.Exit(130) from None


@contextlib.contextmanager
def progress_callback(description: str = "working") -> Iterator[Progress]:
    """A rich progress bar (on stderr) exposed as the library's `Progress` callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.progress import Progress as RichProgress

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    live = sys.stderr.isatty() or os.environ.get("UPCTL_PROGRESS") == "1"
    with RichProgress(*columns, console=err_console, transient=False, disable=not live) as bar:
        tasks: dict[str, Any] = {}

        def update(done: int, total: int | None, desc: str = description) -> None:
            if desc not in tasks:
                tasks[desc] = bar.add_task(desc, total=total)
            bar.update(tasks[desc], completed=done, total=total)

        yield update


def json_to_stdout(json_file: str | Path | None) -> bool:
    """True for `--json -`: the record owns standard output."""
    return json_file is not None and str(json_file) == STDOUT


def report_console(json_file: str | Path | None) -> Console:
    """Where a command prints its human-readable report: stdout, or stderr when `--json -` claims stdout,
    so `upctl tasks --json - | jq` reads clean JSON."""
    return err_console if json_to_stdout(json_file) else console


def write_json(path: str | Path, payload: Any) -> None:
    """Write a `--json FILE` result atomically, or to standard output for `--json -`."""
    text = json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"
    if json_to_stdout(path):
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    from uniperceiver.utils.files import atomic_write_text

    atomic_write_text(Path(path), text)


# ------------------------------------------------------------------------------------------ command classes


def _usage_error_type() -> type[Exception]:
    """Click's UsageError: vendored inside typer (>= 0.20) or the click package (older typer)."""
    try:
        from typer._click.exceptions import UsageError
    except ImportError:  # typer < 0.20 runs on the click package
        from click.exceptions import UsageError
    return UsageError


@contextlib.contextmanager
def one_line_usage_errors() -> Iterator[None]:
    """A usage error (missing or unknown option, bad value) as one red line and exit code 2.

    Typer prints a usage line, a hint and a boxed panel instead; every other error of `upctl` is
    one line (`fail_on_error`), so usage errors are too. Asking for help with no arguments
    (`upctl`) still prints the help.
    """
    usage_error = _usage_error_type()
    try:
        yield
    except usage_error as exc:
        if type(exc).__name__ == "NoArgsIsHelpError" or debug_enabled():
            raise
        ctx = getattr(exc, "ctx", None)  # click's attribute, None when raised outside a context
        where = ctx.command_path if ctx is not None else "upctl"
        message = " ".join(exc.format_message().split())  # click's messages may span lines
        err_console.print(f"[bold red]error:[/] {escape(message)} (see `{escape(where)} --help`)",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _no_flag_placeholder(param: object) -> None:
    """A yes/no flag takes no value, so its help shows no `<bool>` type (typer's rich help does)."""
    if isinstance(param, typer.core.TyperOption) and param.is_flag and param.metavar is None:
        param.metavar = ""


class _FlagsWithoutPlaceholders:
    """Help shows no value placeholder for flags (`--quick`, not `--quick <bool>`), `--help` included."""

    params: list[Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            _no_flag_placeholder(param)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        _no_flag_placeholder(option)
        return option


class UpctlCommand(_FlagsWithoutPlaceholders, typer.core.TyperCommand):
    """A subcommand of `upctl`."""


class UpctlGroup(_FlagsWithoutPlaceholders, typer.core.TyperGroup):
    """The `upctl` group: usage errors of any subcommand as one line."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with one_line_usage_errors():  # `upctl --nosuch`, `upctl evalute`
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with one_line_usage_errors():  # a subcommand's options are parsed here
            return super().invoke(ctx)
