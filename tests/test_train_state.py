"""The trainer's one state and its engine-side periodic evaluation, on the real `mini` data.

Covers: a `TrainState` goes through a training checkpoint as one unit (shared part in trainer.pt,
each rank's cursors and RNG in rng-rank<r>.pt) and puts the loader, the loss scale and the RNG
back exactly; a checkpoint of an older state version is one clear error; periodic evaluation runs
inside the engine (no hook passed), writes the metrics log, says one line, and its scores survive in
the checkpoint; under torchrun only rank 0 prints and our code raises no FutureWarning.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from uniperceiver.config import recipe_from_dict
from uniperceiver.engine import train_checkpoint as ckpt
from uniperceiver.engine.distributed import DistEnv
from uniperceiver.engine.loader import MultiTaskLoader
from uniperceiver.engine.optim import build_optimizer, build_scheduler
from uniperceiver.engine.runs import read_metrics
from uniperceiver.engine.train_state import STATE_VERSION, LogWindow, TrainState
from uniperceiver.engine.trainer import train
from uniperceiver.errors import CheckpointError
from uniperceiver.evaluation.harness import evaluate_task
from uniperceiver.modeling import build_model
from uniperceiver.tasks.catalog import build_task, task_config
from uniperceiver.utils.digests import file_digest

sys.path.insert(0, str(Path(__file__).parent))
from _trainer_fixtures import mini_data, one_thread  # noqa: E402,F401  (shared fixtures)

REPO = Path(__file__).resolve().parents[1]


def _parts(mini_data: Path) -> ckpt.Trainables:
    model = build_model("tiny", depth=1, width=64, heads=2, mlp_dim=128)
    tasks = [build_task(task_config(n), mini_data, model.cfg) for n in ("mini-faces", "mini-photos-retrieval")]
    loader = MultiTaskLoader(tasks, [t.examples("train") for t in tasks], weights=[1.0, 1.0], batch_sizes=[4, 4],
                             seed=3)
    optim = recipe_from_dict({"name": "s", "tasks": ["mini-faces"], "optim": {"warmup_steps": 2}}).optim
    optimizer = build_optimizer(model, optim)
    return ckpt.Trainables(model, optimizer, build_scheduler(optimizer, optim, 10),
                           torch.amp.GradScaler("cuda", enabled=False), loader)


def test_train_state_round_trips_through_a_checkpoint_as_one_unit(mini_data, tmp_path):
    parts = _parts(mini_data)
    consumed = [next(parts.loader).ids for _ in range(3)]
    state = TrainState(step=7, skipped_steps=2,
                       window=LogWindow([("mini-faces", 0.5, {"acc": 1.0}), ("mini-photos-retrieval", float("nan"), {})], 8),
                       evals={4: {"mini-faces/top1": 62.5}})
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    path = ckpt.save_training_checkpoint(tmp_path / "checkpoints", state, parts, DistEnv(), keep=2,
                                         meta={"recipe": "s", "stage": "pretrain"})
    after_save = (random.random(), float(np.random.rand()), float(torch.rand(1)))  # the next draws of the saved RNG
    expected_batches = [next(parts.loader).ids for _ in range(2)]
    assert path.name == "step-000007" and consumed

    loaded = ckpt.load_checkpoint(path)
    back = loaded.state
    assert (back.step, back.skipped_steps, back.world_size, back.evals) == (7, 2, 1, {4: {"mini-faces/top1": 62.5}})
    assert back.window.samples == 8 and back.window.rows[0] == ("mini-faces", 0.5, {"acc": 1.0})
    assert np.isnan(back.window.rows[1][1])
    assert back.data["draw"] == 3 and back.loss_scale is None
    assert loaded.trainer["step"] == 7 and loaded.trainer["version"] == STATE_VERSION  # trainer.pt, as written
    assert loaded.rank_state["data"] == back.data

    fresh = _parts(mini_data)
    random.seed(0)
    torch.manual_seed(0)
    said: list[str] = []
    back.restore(fresh.loader, fresh.scaler, said.append)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == after_save
    assert [next(fresh.loader).ids for _ in range(2)] == expected_batches and not said

    # a rank the checkpoint has no file for: cursors restart, and the caller is told
    other = ckpt.load_checkpoint(path, rank=1).state
    assert other.data is None and other.rank_dict() is None
    other.restore(_parts(mini_data).loader, fresh.scaler, said.append)
    assert said and "no state for this rank" in said[0]


def test_a_checkpoint_of_an_older_state_version_is_one_clear_error(mini_data, tmp_path):
    parts = _parts(mini_data)
    path = ckpt.save_training_checkpoint(tmp_path / "checkpoints", TrainState(step=1), parts, DistEnv(), keep=1,
                                         meta={})
    old = {"step": 1, "skipped_steps": 0, "world_size": 1}  # what trainer.pt held before the TrainState
    torch.save(old, path / "trainer.pt")
    meta = json.loads((path / "meta.json").read_text())  # its checksum, as the older version wrote it
    meta["files"]["trainer.pt"] = file_digest(path / "trainer.pt", meta["digest"])
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"trainer\.pt: training state version None, expected"):
        ckpt.load_checkpoint(path)


def test_periodic_evaluation_runs_in_the_engine_and_logs(mini_data, tmp_path):
    raw = {"name": "eval-in-engine", "model": {"size": "tiny", "overrides": {"depth": 1, "drop_path": 0.0}},
           "optim": {"lr": 1e-3, "warmup_steps": 1},
           "train": {"max_steps": 4, "eval_every": 2, "ckpt_every": 2, "log_every": 1, "seed": 0},
           "eval": {"limit": 12}, "tasks": [{"name": "mini-faces", "batch_size": 4}]}
    said: list[str] = []
    result = train(recipe_from_dict(raw), output=tmp_path / "run", data_dir=mini_data, log=said.append)
    assert sorted(result.evals) == [2, 4] and "mini-faces/top1" in result.evals[4]
    rows = [r for r in read_metrics(tmp_path / "run") if r["phase"] == "eval"]
    assert {r["step"] for r in rows} == {"2", "4"}
    logged = {r["name"]: float(r["value"]) for r in rows if r["step"] == "4"}
    assert logged == pytest.approx(result.evals[4], rel=1e-12)
    assert [line for line in said if line.startswith("eval at step")] == [
        f"eval at step {s}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.evals[s].items()) for s in (2, 4)]
    # the scores are the harness's on the final weights (step 4 is the last step)
    task = build_task(task_config("mini-faces"), mini_data, result.model.cfg)
    again = evaluate_task(result.model, task, split="val", limit=12)
    assert {f"mini-faces/{k}": float(v) for k, v in again.metrics.items()} == pytest.approx(result.evals[4])
    # ... and they are part of the TrainState the checkpoint keeps
    assert ckpt.load_checkpoint(tmp_path / "run" / "checkpoints" / "step-000002").state.evals == {2: result.evals[2]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_prints_once_and_our_code_raises_no_future_warning(mini_data, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "two-ranks", "model": {"size": "tiny", "overrides": {"depth": 1, "width": 64, "heads": 2, "mlp_dim": 128}},
        "optim": {"warmup_steps": 1}, "train": {"max_steps": 2, "log_every": 1, "eval_every": 2, "ckpt_every": 0},
        "eval": {"limit": 8},
        "tasks": [{"name": "mini-faces", "batch_size": 4},
                  {"name": "mini-news-mlm", "batch_size": 2, "options": {"max_len": 24}}]}))
    launcher = tmp_path / "launch.py"
    launcher.write_text("import sys\nfrom upctl.main import app\nsys.exit(app())\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="always::FutureWarning",
               COLUMNS="300")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "UPCTL_DEBUG"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(launcher),
           "pretrain", str(recipe), "--data-dir", str(mini_data), "--output", str(tmp_path / "run"), "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert text.count("done: step 2/2") == 1 and text.count("pre-training: recipe 'two-ranks'") == 1, text[-3000:]
    assert text.count("eval at step 2: mini-faces/top1") == 1 and text.count("x 2 ranks (ddp)") == 1, text[-3000:]
    ours = [ln for ln in text.splitlines() if "FutureWarning" in ln and re.search(r"(uniperceiver|upctl)/", ln)]
    assert not ours, ours


def test_periodic_evaluation_decodes_with_the_training_loader_workers(mini_data, tmp_path, monkeypatch):
    """`train.num_workers` reaches the periodic evaluation, and workers change no prediction."""
    from uniperceiver.config.schema import EvalSection
    from uniperceiver.engine import periodic_eval

    model = build_model("tiny", depth=1)
    tasks = [build_task(task_config("mini-faces"), mini_data, model.cfg)]
    section = EvalSection(limit=12)
    plain = periodic_eval.evaluate_tasks(model, tasks, section)
    workers = periodic_eval.evaluate_tasks(model, tasks, section, num_workers=2)
    assert plain["mini-faces"].predictions == workers["mini-faces"].predictions
    assert plain["mini-faces"].metrics == workers["mini-faces"].metrics and plain["mini-faces"].num_samples == 12

    seen: list[int] = []
    real = periodic_eval.evaluate_tasks

    def spy(model, tasks, section, num_workers=0):
        seen.append(num_workers)
        return real(model, tasks, section, num_workers)

    monkeypatch.setattr(periodic_eval, "evaluate_tasks", spy)
    raw = {"name": "eval-workers", "model": {"size": "tiny", "overrides": {"depth": 1, "drop_path": 0.0}},
           "optim": {"lr": 1e-3, "warmup_steps": 1},
           "train": {"max_steps": 2, "eval_every": 2, "log_every": 1, "seed": 0, "num_workers": 1},
           "eval": {"limit": 6}, "tasks": [{"name": "mini-faces", "batch_size": 4}]}
    result = train(recipe_from_dict(raw), output=tmp_path / "run", data_dir=mini_data, log=lambda m: None)
    assert seen == [1] and "mini-faces/top1" in result.evals[2]
