"""Exact resume: a run killed with SIGKILL mid-way and resumed with `--resume auto` reproduces the
uninterrupted run's losses and final weights; SIGTERM saves a checkpoint and exits 143; corrupt
checkpoints fall back to the previous one with a warning naming both; a checkpoint of another
model size is one clear error.

The killed run is a subprocess with one intra-op thread (OMP_NUM_THREADS=1), like the in-process
reference run and the in-process resume, so floating-point results are comparable bit for bit on CPU.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from uniperceiver.config import load_recipe
from uniperceiver.engine import train_checkpoint as ckpt
from uniperceiver.engine.runs import read_metrics
from uniperceiver.engine.trainer import train
from uniperceiver.errors import CheckpointError
from upctl.main import app

import sys as _sys
_sys.path.insert(0, str(Path(__file__).parent))
from _trainer_fixtures import mini_data, one_thread  # noqa: E402,F401  (shared fixtures)

REPO = Path(__file__).resolve().parents[1]


def write_recipe(path: Path, **train_overrides) -> Path:
    raw = {
        "name": "resume-test",
        "model": {"size": "tiny", "overrides": {"depth": 2, "drop_path": 0.1}},  # drop path: uses the torch RNG
        "optim": {"lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.05, "min_lr": 1e-5, "clip_grad": 1.0},
        "train": {"max_steps": 8, "ckpt_every": 3, "log_every": 1, "seed": 5, "keep_checkpoints": 2,
                  **train_overrides},
        "tasks": [{"name": "mini-faces", "batch_size": 4},
                  {"name": "mini-photos-retrieval", "batch_size": 4}],
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def env1() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("UPCTL_DEBUG", None)
    return env


CLI = [sys.executable, "-c", "from upctl.main import app; app()"]

KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from uniperceiver.config import load_recipe
    from uniperceiver.engine.trainer import train

    recipe, output, data, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    def progress(report):
        if report.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit, mid-run

    train(load_recipe(recipe), output=output, data_dir=data, progress=progress)
    """
)


def step_losses(run: Path) -> dict[tuple[int, str], float]:
    return {(int(r["step"]), r["task"]): float(r["value"]) for r in read_metrics(run)
            if r["phase"] == "train" and r["name"] == "loss" and r["task"]}


def test_sigkill_mid_run_then_resume_auto_matches_uninterrupted(mini_data, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml")
    reference = train(load_recipe(recipe), output=tmp_path / "reference", data_dir=mini_data, log=lambda m: None)
    assert reference.step == 8

    killed = tmp_path / "killed"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    proc = subprocess.run([sys.executable, str(script), str(recipe), str(killed), str(mini_data), "5"],
                          env=env1(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in ckpt.list_checkpoints(killed / "checkpoints")] == ["step-000003"]
    assert max(s for s, _ in step_losses(killed)) == 5  # rows logged after the checkpoint exist
    assert not (killed / "final").exists()

    # the command, in-process (same single thread as the reference run)
    res = CliRunner().invoke(app, ["pretrain", str(recipe), "--output", str(killed), "--resume", "auto",
                                   "--data-dir", str(mini_data)])
    assert res.exit_code == 0, res.output
    assert "resumed from" in res.output and "step-000003" in res.output

    want, got = step_losses(tmp_path / "reference"), step_losses(killed)
    assert sorted(got) == sorted(want) and len(want) == 8  # no duplicated rows for steps 4-5
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    a = load_file(str(tmp_path / "reference" / "final" / "model.safetensors"))
    b = load_file(str(killed / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, worst
    # keep_checkpoints=2: only the two newest step folders remain, the pointer names the newest
    assert [p.name for p in ckpt.list_checkpoints(killed / "checkpoints")] == ["step-000008", "step-000006"]
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step-000008"


def test_sigterm_saves_a_checkpoint_and_exits_143(mini_data, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", max_steps=500, ckpt_every=0)
    out = tmp_path / "run"
    proc = subprocess.Popen([*CLI, "pretrain", str(recipe), "--output", str(out), "--data-dir", str(mini_data)],
                            env=env1(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if (out / "metrics.csv").is_file() and any(int(r["step"]) >= 2 for r in read_metrics(out)):
                break
            if proc.poll() is not None:
                break
            time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stdout[-2000:] + stderr[-2000:]
    assert "SIGTERM" in stdout and "--resume auto" in stdout
    saved = ckpt.find_valid_checkpoint(out / "checkpoints")
    assert saved is not None
    step = ckpt.load_checkpoint(saved).step
    assert 2 <= step < 500
    assert not (out / "final").exists()


def test_corrupt_checkpoint_falls_back_with_a_warning_naming_both(mini_data, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", max_steps=4, ckpt_every=2, keep_checkpoints=3))
    run = tmp_path / "run"
    train(recipe, output=run, data_dir=mini_data, log=lambda m: None)
    root = run / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-000004", "step-000002"]
    for f in root.glob("step-*/*.pt"):
        torch.load(f, weights_only=True)  # plain containers and tensors only
    newest = root / "step-000004"
    data = bytearray((newest / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / "optimizer.pt").write_bytes(bytes(data))
    (root / ".tmp-step-000006").mkdir()  # an interrupted save leaves only a temp folder: ignored

    warnings: list[str] = []
    found = ckpt.find_valid_checkpoint(root, warn=warnings.append)
    assert found == root / "step-000002"
    assert len(warnings) == 1 and "step-000004" in warnings[0] and "step-000002" in warnings[0]
    assert "checksum" in warnings[0]

    messages: list[str] = []
    result = train(recipe, output=run, resume="auto", max_steps=5, data_dir=mini_data, log=messages.append)
    assert result.resumed_from == root / "step-000002" and result.step == 5
    assert any("corrupt" in m and "step-000004" in m for m in messages)


def test_resume_with_a_model_of_another_size_is_one_clear_error(mini_data, tmp_path):
    path = write_recipe(tmp_path / "recipe.yaml", max_steps=2, ckpt_every=2)
    run = tmp_path / "run"
    train(load_recipe(path), output=run, data_dir=mini_data, log=lambda m: None)
    bigger = load_recipe(path, ["model.overrides.depth=3"])
    with pytest.raises(CheckpointError, match="does not fit this recipe's model.*missing key"):
        train(bigger, output=run, resume="auto", max_steps=3, data_dir=mini_data, log=lambda m: None)
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train(load_recipe(path), output=run, data_dir=mini_data, log=lambda m: None)


def test_resume_auto_without_output_continues_the_newest_run_of_the_same_recipe(mini_data, tmp_path):
    path = write_recipe(tmp_path / "recipe.yaml", max_steps=2, ckpt_every=2)
    runs_root = tmp_path / "runs"
    first = train(load_recipe(path), runs_root=runs_root, data_dir=mini_data, log=lambda m: None)
    assert first.run_dir.parent == runs_root and first.run_dir.name.startswith("pretrain-resume-test-")
    other = load_recipe(path, ["name=another"])
    train(other, runs_root=runs_root, data_dir=mini_data, log=lambda m: None)  # a newer run of another recipe
    again = train(load_recipe(path), runs_root=runs_root, resume="auto", max_steps=3, data_dir=mini_data,
                  log=lambda m: None)
    assert again.run_dir == first.run_dir and again.resumed_from == first.run_dir / "checkpoints" / "step-000002"
    assert again.step == 3 and len(again.history) == 1


def _tb_steps(run: Path, tag: str) -> list[int]:
    """Steps of a TensorBoard scalar as TensorBoard shows them. Event files of version 2 (what the
    writer produces) are purged only at the writer's restart marker (`purge_step`), never by
    guessing from out-of-order steps: without the marker the redone steps show twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_tensorboard_curves_of_a_resumed_run_have_no_duplicate_steps(mini_data, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", max_steps=4, ckpt_every=2, keep_checkpoints=5))
    run = tmp_path / "run"
    train(recipe, output=run, data_dir=mini_data, log=lambda m: None)
    assert _tb_steps(run, "train/loss") == [1, 2, 3, 4]
    # resume from step 2: steps 3 and 4 are trained again and logged again
    train(recipe, output=run, resume=run / "checkpoints" / "step-000002", data_dir=mini_data, log=lambda m: None)
    assert _tb_steps(run, "train/loss") == [1, 2, 3, 4]
    assert [int(r["step"]) for r in read_metrics(run) if r["name"] == "loss" and not r["task"]] == [1, 2, 3, 4]
