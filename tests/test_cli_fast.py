"""`upctl` starts fast: help and the listing commands never import torch; global options work.

Each check runs the real Typer app in a fresh interpreter (`python -c`), because an import made
anywhere earlier in the test process would hide one made by the command. BENCHMARKS.md ("CLI
start-up") has the wall times this protects.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from upctl.main import app

REPO = Path(__file__).resolve().parents[1]

# Invoke the app once per argument list (in order) and report, after each, whether torch is loaded.
PROBE = """
import json, sys
from typer.testing import CliRunner
from upctl.main import app
calls = json.loads(sys.argv[1])
if calls == "every-command-help":
    calls = [["--help"]] + [[c.name, "--help"] for c in app.registered_commands]
out = []
for args in calls:
    res = CliRunner().invoke(app, args)
    out.append({"args": args, "exit": res.exit_code, "torch": "torch" in sys.modules, "output": res.output})
print(json.dumps(out))
"""

def _probe(calls: object) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(calls)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_help_of_the_app_and_of_every_command_does_not_import_torch() -> None:
    results = _probe("every-command-help")
    names = {r["args"][0] for r in results}
    assert {"--help", "zeroshot", "evaluate", "predict", "tasks", "recipes", "validate", "prepare", "pretrain",
            "prompt-tune", "finetune", "bench", "convert", "demo"} <= names
    for r in results:
        assert r["exit"] == 0, r
        assert not r["torch"], f"`upctl {' '.join(r['args'])}` imported torch"
    assert "zeroshot" in results[0]["output"] and "--debug" in results[0]["output"]


@pytest.mark.parametrize("args", [
    ["tasks"],
    ["tasks", "--options"],
    ["recipes"],
    ["validate", "recipes/tiny.yaml"],
], ids=lambda a: " ".join(a))
def test_listing_and_validating_do_not_import_torch(args: list[str]) -> None:
    (r,) = _probe([args])
    assert r["exit"] == 0, r
    assert not r["torch"], f"`upctl {' '.join(args)}` imported torch"


def test_the_probe_sees_a_torch_import() -> None:
    """The check itself: a command that needs the model (a zero-shot run that fails late) is caught."""
    (r,) = _probe([["zeroshot", "--task", "mini-digits", "--checkpoint", "no-such-folder"]])
    assert r["exit"] == 1 and r["torch"]


# ------------------------------------------------------------------------------------------ global options


def test_debug_flag_shows_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from uniperceiver.errors import ConfigError

    monkeypatch.delenv("UPCTL_DEBUG", raising=False)
    runner = CliRunner()
    plain = runner.invoke(app, ["validate", str(tmp_path / "absent.yaml")])
    assert plain.exit_code == 1 and "error: recipe file not found" in plain.stderr
    assert plain.exception is None or isinstance(plain.exception, SystemExit)
    debug = runner.invoke(app, ["--debug", "validate", str(tmp_path / "absent.yaml")])
    assert debug.exit_code == 1 and isinstance(debug.exception, ConfigError)
    assert "error:" not in debug.stderr  # the exception propagates instead of the one line
    again = runner.invoke(app, ["validate", str(tmp_path / "absent.yaml")])
    assert again.exit_code == 1 and "error: recipe file not found" in again.stderr  # --debug did not stick
    monkeypatch.setenv("UPCTL_DEBUG", "1")
    env = runner.invoke(app, ["validate", str(tmp_path / "absent.yaml")])
    assert isinstance(env.exception, ConfigError)


@pytest.mark.parametrize("args", [
    ["tasks", "--kind", "mini"],
    ["validate", "recipes/tiny.yaml"],
], ids=lambda a: a[0])
def test_json_dash_writes_the_record_to_standard_output(args: list[str], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`--json -` puts only JSON on stdout (the table moves to stderr) and creates no file named '-'."""
    monkeypatch.chdir(tmp_path)
    args = [str(REPO / a) if a.endswith(".yaml") else a for a in args]
    res = CliRunner().invoke(app, [*args, "--json", "-"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert payload and not (tmp_path / "-").exists()
    assert res.stderr.strip()  # the human-readable report is still shown
    with_file = CliRunner().invoke(app, [*args, "--json", "out.json"])
    assert with_file.exit_code == 0 and json.loads((tmp_path / "out.json").read_text()) == payload


# ------------------------------------------------------------------------------------------ packaging


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project built as a wheel, the way `pip wheel . --no-deps` does (without fetching setuptools)."""
    import shutil

    pytest.importorskip("setuptools")
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    # A copy of what the build reads, so setuptools' build/ and egg-info never land in the checkout.
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("uniperceiver", "upctl", "recipes"):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=skip)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (path,) = out.glob("uniperceiver-*.whl")
    return path


def test_the_wheel_ships_every_recipe(wheel: Path) -> None:
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"uniperceiver/recipes/{p.relative_to(REPO / 'recipes').as_posix()}" for p in (REPO / "recipes").rglob("*.yaml")}
    assert len(shipped) > 40 and shipped <= names, sorted(shipped - names)[:5]
    assert "uniperceiver/tokenizers/bpe_simple_vocab_16e6.txt.gz" in names and "upctl/main.py" in names


def test_an_installed_wheel_finds_its_recipes(wheel: Path, tmp_path: Path) -> None:
    """Unpacked (a pure-Python wheel is its install tree) and run from a folder without recipes/."""
    import os
    import zipfile

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import uniperceiver; from uniperceiver.config import find_recipe_file, list_recipes; "
            "print(uniperceiver.__file__); print(find_recipe_file('tiny')); print(len(list_recipes()))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("UPCTL_RECIPES", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    where, tiny, count = proc.stdout.split()
    assert where.startswith(str(site)) and tiny == str(site / "uniperceiver" / "recipes" / "tiny.yaml")
    assert int(count) == len(list((REPO / "recipes").rglob("*.yaml")))
