"""Small helpers shared by the commands: one-line errors, the rich console, progress bars."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from uniperceiver.errors import UpctlError

console = Console(stderr=False)
err_console = Console(stderr=True)


def debug_enabled() -> bool:
    """`--debug` is read from the environment so every command honours it the same way."""
    return os.environ.get("UPCTL_DEBUG", "") not in ("", "0")


@contextlib.contextmanager
def fail_on_error() -> Iterator[None]:
    """Turn an expected error into one red line and exit code 1 (a traceback only with UPCTL_DEBUG=1)."""
    try:
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
def progress_callback(description: str = "working") -> Iterator[Callable[[int, int | None, str], None]]:
    """A rich progress bar exposed as the library's `progress(done, total, description)` callback."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console, transient=False, disable=not sys.stderr.isatty() and os.environ.get("UPCTL_PROGRESS") != "1") as bar:
        tasks: dict[str, Any] = {}

        def update(done: int, total: int | None, desc: str = description) -> None:
            if desc not in tasks:
                tasks[desc] = bar.add_task(desc, total=total)
            bar.update(tasks[desc], completed=done, total=total)

        yield update


def write_json(path: str | Path, payload: Any) -> None:
    """Write a `--json FILE` result atomically."""
    from uniperceiver.utils.io import atomic_write_text

    atomic_write_text(Path(path), json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
