"""Every `upctl` command shown in the README is checked against the real CLI so none goes stale.

Each command line in a fenced shell block is parsed by the Typer/Click command it names: the
subcommand must exist and every option and argument must be accepted (Click's own parser, with
the command's callback not run). Commands that run on the built-in mini data are executed for
real in other tests (test_demo, test_prepare_cli, test_evaluate, test_recipes); here the
cheap ones also run end to end.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from upctl.main import app

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_commands() -> list[str]:
    text = README.read_text()
    blocks = re.findall(r"```(?:bash|sh|console|shell)?\n(.*?)```", text, flags=re.S)
    commands: list[str] = []
    for block in blocks:
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.strip().lstrip("$ ").strip()
            if line.startswith("upctl ") or line.startswith("torchrun ") and " upctl" in line:
                commands.append(line.split(" #")[0].strip())
    return commands


def _upctl_args(command: str) -> list[str]:
    words = shlex.split(command)
    if words[0] == "torchrun":
        words = words[words.index("-m") + 2:] if "-m" in words else words[words.index("upctl") + 1:]
        return words
    return words[1:]


COMMANDS = _readme_commands()


def test_readme_has_commands() -> None:
    assert len(COMMANDS) >= 10, COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command: str) -> None:
    group = typer.main.get_command(app)
    args = _upctl_args(command)
    if args in (["--version"], ["--help"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        return
    assert args, command
    name = args[0]
    assert name in group.commands, f"README uses unknown subcommand {name!r}: {command}"
    cmd = group.commands[name]
    ctx = cmd.make_context(name, args[1:], resilient_parsing=False)
    assert ctx.params is not None


def test_cheap_readme_commands_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`upctl --version`, `upctl tasks`, `upctl recipes` and `upctl validate` run for real."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    runner = CliRunner()
    ran = 0
    for command in COMMANDS:
        args = _upctl_args(command)
        if args[:1] in (["--version"], ["tasks"], ["recipes"], ["validate"]):
            result = runner.invoke(app, args)
            assert result.exit_code == 0, (command, result.output)
            ran += 1
    assert ran >= 3
