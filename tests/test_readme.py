"""Every `upctl` command shown in the README is checked against the real CLI so none goes stale.

- Each command line in a fenced shell block is parsed by the Typer/Click command it names: the
  subcommand must exist and every option and argument must be accepted.
- The "command line" section is run top to bottom as a newcomer would, in a fresh folder on the
  `mini` data (training commands with `--max-steps 4` to stay fast; `upctl bench --quick` takes
  minutes and is left to test_newcomer.py's rendering check and BENCHMARKS.md).
- `scripts/readme_examples.sh` (the README's examples and mistakes) runs with a 2-step
  pre-training, and every `console` transcript quoted in the README must match its output in
  form: same command, same table headers and metric names, same line shapes; numbers, absolute
  paths and the ranked candidates' words may differ.
- The README's demo table must equal the table of the recorded demo run committed under
  docs/demo/ (its own results.md, rendered from its results.json).
"""

from __future__ import annotations

import re
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from upctl.main import app

README = Path(__file__).resolve().parents[1] / "README.md"


def _fenced_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(language, lines) of every fenced block, opening and closing fences paired in order."""
    blocks: list[tuple[str, list[str]]] = []
    lang: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, lines = line[3:].strip(), []
            else:
                blocks.append((lang, lines))
                lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


def _readme_commands(text: str | None = None) -> list[str]:
    """`upctl ...` lines of the shell blocks (console transcripts are run by the example script instead)."""
    text = README.read_text() if text is None else text
    commands: list[str] = []
    for lang, lines in _fenced_blocks(text):
        if lang not in ("", "bash", "sh", "shell"):
            continue
        joined = "\n".join(lines).replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.strip().lstrip("$ ").strip()
            if line.startswith("upctl ") or line.startswith("torchrun ") and " upctl" in line:
                commands.append(line.split(" #")[0].strip())
    return commands


def _section(title: str) -> str:
    """The README text under `## title`, up to the next `## ` heading."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


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


# ------------------------------------------------------------------------------------------ the command line, in order

#: Commands of the "command line" section not run here, and why.
NOT_RUN = {"bench": "minutes of measurements; its tables are checked at 80 columns in test_newcomer.py"}
#: Training commands run with a step cap: the README's runs are 40-60 steps, the point here is that they run.
SHORT = ["--max-steps", "4"]


def test_the_command_line_section_runs_in_order_in_a_fresh_folder(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A newcomer's first hour: each command of the section, as written, from an empty folder."""
    pytest.importorskip("skvideo")  # `upctl prepare mini` needs the mini extra
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UPCTL_CACHE", str(tmp_path / "cache"))
    for var in ("UPCTL_DATA", "UPCTL_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    runner = CliRunner()
    results = {}
    for command in _readme_commands(_section("The command line")):
        args = _upctl_args(command)
        if args[0] in NOT_RUN:
            continue
        if args[0] in ("pretrain", "prompt-tune", "finetune"):
            args = args + SHORT
        res = runner.invoke(app, args)
        assert res.exit_code == 0, (command, res.output)
        results[args[0]] = res
    assert set(results) >= {"prepare", "tasks", "recipes", "validate", "pretrain", "zeroshot", "prompt-tune",
                            "finetune", "evaluate", "predict"}, sorted(results)
    # what the section promises about defaults and media
    pretrain_run = next((tmp_path / "runs").glob("pretrain-tiny-*"))
    assert f"using the newest pre-training checkpoint: {pretrain_run / 'final'}" in results["zeroshot"].stderr
    tuned = next((tmp_path / "runs").glob("finetune-mini-faces-*"))
    assert f"using the newest tuned run of mini-faces: {tuned / 'final'}" in results["evaluate"].stderr
    for name in ("zeroshot", "evaluate"):
        assert re.search(r"┃ metric\s+┃\s+value ┃", results[name].stdout), results[name].stdout
        assert re.search(r"│ top1\s+│\s+[\d.]+ │", results[name].stdout)
    assert "chelsea.png" in results["predict"].stdout and "a cat (" in results["predict"].stdout
    for folder in ("photos", "video"):  # the media the section points to
        assert f"data/raw/mini/{folder}/" in _section("The command line")
        assert any((tmp_path / "data" / "raw" / "mini" / folder).iterdir())
    assert (tmp_path / "data" / "raw" / "mini" / "video" / "bikes.mp4").is_file()


# ------------------------------------------------------------------------------------------ the example script


def _readme_transcripts() -> list[tuple[str, list[str]]]:
    """(command, output lines) of every `console` block: `$ upctl ...` lines and what follows each."""
    out: list[tuple[str, list[str]]] = []
    for lang, lines in _fenced_blocks(README.read_text()):
        if lang != "console":
            continue
        for line in lines:
            if line.startswith("$ "):
                out.append((line[2:], []))
            elif out:
                out[-1][1].append(line)
    return out


def _script_transcripts(output: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in output.splitlines():
        if line.startswith("$ "):
            current = found.setdefault(line[2:], [])
        elif current is not None:
            current.append(line)
    return found


def _shape(line: str) -> str:
    """A line's form: numbers -> N, absolute paths -> PATH, table rules and runs of spaces collapsed.
    Rows of a ranked-candidates table also lose their words (which candidate wins is the model's)."""
    line = re.sub(r"(?<![\w.])/[^\s:;,'`()]+", "PATH", line)
    line = re.sub(r"\d+(?:\.\d+)?", "N", line)
    line = re.sub(r"[━─]+", "-", line)
    line = re.sub(r"\s+", " ", line).strip()
    if line.startswith("│") and "(N, N)" in line:
        line = re.sub(r"[✓✗]", "m", re.sub(r"[A-Za-z]+", "w", line))
    return line


def _is_subsequence(wanted: list[str], lines: list[str]) -> str | None:
    """None when every wanted line occurs in `lines` in order, else the first that does not."""
    it = iter(lines)
    for w in wanted:
        if not any(w == line for line in it):
            return w
    return None


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """scripts/readme_examples.sh run once (2 pre-training steps) in a fresh folder: (folder, output)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("skvideo")
    out = tmp_path_factory.mktemp("readme-examples")
    env = {**os.environ, "PRETRAIN_STEPS": "2", "COLUMNS": "100", "PYTHONUNBUFFERED": "1",
           "UPCTL_CACHE": str(out / "cache"), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for var in ("UPCTL_DATA", "UPCTL_DEBUG"):
        env.pop(var, None)
    proc = subprocess.run(["bash", str(README.parent / "scripts" / "readme_examples.sh"), str(out / "ex")],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
    yield out / "ex", proc.stdout
    shutil.rmtree(out, ignore_errors=True)  # module done: free its disk now, not at session end


@pytest.mark.slow
def test_every_readme_transcript_is_the_example_scripts_output_in_form(examples: tuple[Path, str]) -> None:
    _, output = examples
    ran = _script_transcripts(output)
    quoted = _readme_transcripts()
    assert len(quoted) >= 8, quoted
    for command, lines in quoted:
        assert command in ran, f"the README quotes `{command}`, which scripts/readme_examples.sh does not run"
        wanted = [_shape(ln) for ln in lines if ln.strip() and ln.strip() != "..."]
        missing = _is_subsequence(wanted, [_shape(ln) for ln in ran[command]])
        assert missing is None, f"`{command}`: the README shows a line like {missing!r}; the script printed:\n" + \
            "\n".join(ran[command])
    errors = [ln for cmd, lines in quoted for ln in lines if ln.startswith("error:")]
    assert len(errors) >= 5 and all(len([x for x in ran[c] if x.startswith("error:")]) == 1
                                    for c, lines in quoted if any(x.startswith("error:") for x in lines))


def test_the_shape_comparison_can_fail() -> None:
    """The check above would notice a renamed metric, a lost table column or a second error line."""
    quoted = ["│ top1     │ 48.00 │", "50 of 50 sample(s) scored; 1.0 s"]
    assert _is_subsequence([_shape(q) for q in quoted], [_shape("│ top1 │ 3.00 │"), _shape("5 of 9 sample(s) scored; 0.2 s")]) is None
    assert _is_subsequence([_shape(q) for q in quoted], [_shape("│ top-1 │ 3.00 │"), _shape("5 of 9 samples; 0.2 s")]) is not None
    row = "│ eight/0018.png │ zero (0.918, 0.42); four (0.879, 0.24); three (0.812, 0.09)   │ eight ✗ │"
    assert _shape(row) == _shape("│ one/0070.png │ six (0.1, 0.2); one (0.3, 0.4); two (0.5, 0.6) │ one ✓ │")
    assert _shape(row) != _shape("│ one/0070.png │ six (0.1, 0.2); one (0.3, 0.4) │ one ✓ │")


@pytest.mark.slow
def test_the_examples_claims_match_what_the_script_built(examples: tuple[Path, str]) -> None:
    import json

    import yaml

    folder, _ = examples
    section = _section("Zero-shot on a dataset, and on your own task")
    vqa = json.loads((folder / "vqa.json").read_text())
    answers = vqa["target_labels"]
    assert f"({', '.join(answers)})" in section  # the candidate answers the text names
    assert f"1 time in {len(answers) ** vqa['num_samples']}" in section  # random guessing, every question right
    quoted_yaml = next("\n".join(lines) for lang, lines in _fenced_blocks(section) if lang == "yaml")
    assert yaml.safe_load(quoted_yaml) == yaml.safe_load((folder / "digits-by-example.yaml").read_text())
    custom = json.loads((folder / "custom.json").read_text())
    per_class = {c: len(list((folder / "inputs" / c).iterdir())) for c in custom["candidates"]}
    examples_per_class = {len(list((folder / "examples" / c).iterdir())) for c in custom["candidates"]}
    assert custom["num_samples"] == sum(per_class.values()) == 50 and set(per_class.values()) == {5}
    assert examples_per_class == {3}
    assert "the first 5 images of each class" in section and "the first 3 images of each class" in section


# ------------------------------------------------------------------------------------------ the demo table


RECORDED_DEMO = README.parent / "docs" / "demo"


def _table_rows(markdown: str, header_start: str) -> list[str]:
    lines = markdown.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(header_start))
    rows = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        rows.append(re.sub(r"\*\*", "", ln).strip())  # the README bolds the best regimes
    return rows


def test_the_readme_demo_table_is_the_recorded_runs_own_table() -> None:
    """README's "Measured results" table = the table `upctl demo` wrote for the recorded run (docs/demo/results.md),
    and that file is what the demo's own renderer makes of the run's results.json (not edited by hand)."""
    assert (RECORDED_DEMO / "results.md").is_file(), (
        "no recorded demo run under docs/demo/: copy a run's results.md and results.json there "
        "(`upctl demo` writes them to demo-out/)")
    import json

    from upctl.demo_report import HEADER, render_markdown

    recorded_md = (RECORDED_DEMO / "results.md").read_text()
    results = json.loads((RECORDED_DEMO / "results.json").read_text())
    assert render_markdown(results).strip() == recorded_md.strip()
    header = "| " + HEADER[0]
    assert _table_rows(README.read_text(), header) == _table_rows(recorded_md, header)
