"""Shared pieces of the fault-injection suite.

- `mini_data`: the real `mini` datasets, prepared once per session into a temporary folder.
- `UPCTL` / `run_upctl` / `start_upctl`: the command line as a separate process (what a scheduler
  kills); `invoke`: the same Typer app in-process, for faults injected with monkeypatch.
- `RUN_SETS` + `pretrain_args`: `upctl pretrain recipes/tiny.yaml` (all five tasks) with a narrower
  model and a checkpoint after every step, so kill / resume cycles take seconds.
- `reference_run`: that command run once without interruption (pre-emption and determinism
  tests compare against it).
- `small_recipe` / `write_recipe`: single-task recipes for the in-process tests.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
TINY_RECIPE = REPO / "recipes" / "tiny.yaml"

#: A narrower, shallower tiny model: ~20 MB checkpoints instead of 133 MB keep kill/resume cycles fast.
SMALL_MODEL: dict[str, int] = {"depth": 1, "width": 64, "heads": 2, "mlp_dim": 128}
SMALL_MODEL_SETS = [f"model.overrides.{k}={v}" for k, v in SMALL_MODEL.items()]

#: Steps of the subprocess runs of recipes/tiny.yaml (pre-emption, determinism).
RUN_STEPS = 16
RUN_SETS = SMALL_MODEL_SETS + [
    f"train.max_steps={RUN_STEPS}",
    "train.ckpt_every=1",
    "train.keep_checkpoints=100",  # keep every step: resumed and reference runs are compared step by step
    "train.log_every=1",
    "optim.warmup_steps=2",
    "optim.lr=3e-3",
]

#: The command line, without relying on the console script being installed.
UPCTL = [sys.executable, "-c", "import sys; from upctl.main import app; sys.exit(app())"]

#: torchrun needs a script file; tests write this text into their tmp folder.
LAUNCHER_SOURCE = "import sys\nfrom upctl.main import app\nsys.exit(app())\n"


def subprocess_env(tmp: Path, **extra: str) -> dict[str, str]:
    """Environment of a CLI subprocess: the repository importable, one thread, wide lines, no cache leaks."""
    env = dict(os.environ)
    env.pop("UPCTL_DEBUG", None)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    paths = [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env.update(
        PYTHONPATH=os.pathsep.join(paths),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        COLUMNS="400",
        UPCTL_CACHE=str(Path(tmp) / "target-cache"),
        PYTHONHASHSEED="0",
    )
    env.update(extra)
    return env


def pretrain_args(data_dir: Path, output: Path, *extra_sets: str, recipe: Path = TINY_RECIPE) -> list[str]:
    """`pretrain recipes/tiny.yaml ... --resume auto` with RUN_SETS (later --set values win)."""
    args = ["pretrain", str(recipe), "--data-dir", str(data_dir), "--output", str(output), "--device", "cpu",
            "--resume", "auto"]
    for item in (*RUN_SETS, *extra_sets):
        args += ["--set", item]
    return args


def run_upctl(args: Sequence[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the CLI to the end; stdout and stderr together in `.stdout`."""
    return subprocess.run([*UPCTL, *map(str, args)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def start_upctl(args: Sequence[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start the CLI in the background, stdout + stderr going to `log` (tests poll it)."""
    fh = open(log, "wb")
    try:
        return subprocess.Popen([*UPCTL, *map(str, args)], cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    finally:
        fh.close()  # the child keeps its own descriptor


@dataclass
class CliResult:
    exit_code: int
    output: str
    exception: BaseException | None

    @property
    def flat(self) -> str:
        """The output with every run of whitespace as one space (rich wraps long lines at 80 columns)."""
        return " ".join(self.output.split())


def invoke(args: Sequence[str]) -> CliResult:
    """Run the Typer app in this process (so monkeypatched faults apply); never raises."""
    from typer.testing import CliRunner

    from upctl.main import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    exc = result.exception if not isinstance(result.exception, SystemExit) else None
    return CliResult(result.exit_code, result.output, exc)


def flat(text: str) -> str:
    return " ".join(text.split())


# ------------------------------------------------------------------------------------------ recipes


def small_recipe(tasks: list[dict], **sections: dict) -> dict[str, Any]:
    """A plain-dict recipe of the SMALL_MODEL with a checkpoint after every step."""
    raw: dict[str, Any] = {
        "name": "reliability",
        "stage": "pretrain",
        "model": {"size": "tiny", "overrides": {**SMALL_MODEL, "drop_path": 0.0}},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.0, "min_lr": 1e-5, "clip_grad": 1.0},
        "train": {"max_steps": 4, "ckpt_every": 1, "log_every": 1, "seed": 0, "keep_checkpoints": 10},
        "tasks": tasks,
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


def write_recipe(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------- run contents


def loss_curve(run_dir: Path) -> list[tuple[str, str, str, str, str]]:
    """metrics.csv rows (step, phase, task, name, value) without the wall-clock columns."""
    with open(Path(run_dir) / "metrics.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for r in rows:
        assert all(r.get(k) not in (None, "") for k in ("step", "phase", "name", "value")), f"partial row {r}"
        if r["name"] == "samples_per_s":
            continue
        out.append((r["step"], r["phase"], r["task"], r["name"], r["value"]))
    return out


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> the overall training loss logged for it."""
    return {int(s): float(v) for s, ph, task, name, v in loss_curve(run_dir)
            if ph == "train" and not task and name == "loss"}


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of a model folder: final/ (model.safetensors) or a step folder (model.dcp/)."""
    from uniperceiver.modeling.model_dir import load_state

    return load_state(model_dir)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: different keys"
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} tensor(s) differ, e.g. {differ[:3]}"


def rank_state(step_dir: Path, rank: int = 0) -> dict[str, Any]:
    return torch.load(Path(step_dir) / f"rng-rank{rank}.pt", map_location="cpu", weights_only=True)


def trainer_state(step_dir: Path) -> dict[str, Any]:
    return torch.load(Path(step_dir) / "trainer.pt", map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------ fixtures


# Two shared cores: one intra-op thread for the in-process runs (the trainer tests' fixture, autouse).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _trainer_fixtures import one_thread  # noqa: E402,F401


@pytest.fixture(scope="session")
def mini_data(tmp_path_factory) -> Path:
    """`upctl prepare mini` (every subset the tiny recipe and the tests use), once per session."""
    from uniperceiver.data.format import prepare_dataset

    root = tmp_path_factory.mktemp("reliability-mini") / "data"
    prepare_dataset("mini", None, root, options={"only": "digits,photos,faces,video,news"})
    return root


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, mini_data) -> Path:
    """The pre-emption recipe run once, uninterrupted, as a subprocess: the ground truth."""
    work = tmp_path_factory.mktemp("reference")
    out = work / "run"
    proc = run_upctl(pretrain_args(mini_data, out), cwd=work, env=subprocess_env(work), timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (out / "final" / "model.safetensors").is_file()
    return out
