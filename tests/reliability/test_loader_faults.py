"""Loader faults: a loader worker killed by SIGKILL (what the OOM killer does), a worker stuck in a
read that never returns (a file on a dead network mount), a FIFO in place of a medium.

The run must never hang and never skip data silently: a dead worker is survived (the workers
restart from the consumed state, the batch it owed is read again and counted) and the result is
bit-identical to an undisturbed run; a stuck read ends the run within `train.step_timeout_s`
with one line naming the worker, its pid and the file, and the last checkpoint stays resumable.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from uniperceiver.config import recipe_from_dict
from uniperceiver.engine import train_checkpoint as ckpt
from uniperceiver.engine.trainer import train
from uniperceiver.engine.watchdog import HANG_EXIT_CODE

from ._blocking import alive, blocked_open, children, copy_digits, media_of_draw
from .conftest import assert_same_tensors, load_weights, rank_state, small_recipe, start_upctl, subprocess_env, write_recipe

TASK = "mini-digits"
BATCH = 8
SEED = 0
TASKS = [{"name": TASK, "batch_size": BATCH, "sample_weight": 1.0}]


def _args(recipe: Path, data: Path, out: Path) -> list[str]:
    return ["pretrain", str(recipe), "--data-dir", str(data), "--output", str(out), "--device", "cpu"]


def _wait_for(log: Path, proc: subprocess.Popen, text: str, within: float) -> None:
    end = time.monotonic() + within
    while text not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < end, f"no {text!r} after {within} s\n" + log.read_text(errors="replace")[-3000:]
        time.sleep(0.05)


def _finish(proc: subprocess.Popen, within: float, log: Path) -> int:
    try:
        return proc.wait(timeout=within)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the run still runs {within} s after the fault (hang)\n" + log.read_text(errors="replace")[-3000:])


def test_a_sigkilled_loader_worker_is_survived_and_its_batch_re_read(mini_data, tmp_path):
    steps = 12
    raw = small_recipe(TASKS, train={"max_steps": steps, "ckpt_every": 4, "seed": SEED, "num_workers": 2,
                                     "step_timeout_s": 60})
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    out, log = tmp_path / "run", tmp_path / "run.log"
    proc = start_upctl(_args(recipe, mini_data, out), cwd=tmp_path, env=subprocess_env(tmp_path), log=log)
    try:
        _wait_for(log, proc, f"step 2/{steps}", within=120)
        workers = children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        killed = time.monotonic()
        rc = _finish(proc, 120, log)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    text = " ".join(log.read_text(errors="replace").split())
    print(f"run finished {took:.1f} s after a loader worker was killed")
    assert rc == 0, text[-3000:]
    assert f"(pid {workers[1]}) died" in text and "loader workers restarted" in text, text[-3000:]
    assert f"re-read 1 batch(es) after loader worker deaths" in text, text[-3000:]
    final = out / "checkpoints" / ckpt.step_dir_name(steps)
    state = rank_state(final)["data"]
    assert state["draw"] == steps and state["worker_restarts"] == 1, state  # one draw per step, none skipped
    # nothing skipped or repeated: the same weights as an undisturbed run without workers
    plain = small_recipe(TASKS, train={"max_steps": steps, "ckpt_every": 0, "seed": SEED})
    ref = train(recipe_from_dict(plain), output=tmp_path / "ref", data_dir=mini_data, log=lambda m: None)
    assert_same_tensors(load_weights(out / "final"), load_weights(ref.final_dir), "final weights")


def test_a_stuck_read_in_a_loader_worker_ends_the_run_naming_worker_and_file(mini_data, tmp_path):
    data = copy_digits(mini_data, tmp_path / "copy")
    stuck = media_of_draw(data, TASK, BATCH, SEED, draw=3)[0]
    raw = small_recipe(TASKS, train={"max_steps": 20, "ckpt_every": 1, "seed": SEED, "num_workers": 2,
                                     "step_timeout_s": 6})
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    out, log = tmp_path / "run", tmp_path / "run.log"
    with blocked_open(stuck):
        began = time.monotonic()
        proc = start_upctl(_args(recipe, data, out), cwd=tmp_path, env=subprocess_env(tmp_path), log=log)
        try:
            _wait_for(log, proc, "step 1/", within=120)
            workers = children(proc.pid)
            rc = _finish(proc, 40, log)
        finally:
            if proc.poll() is None:
                proc.kill()
        took = time.monotonic() - began
    text = " ".join(log.read_text(errors="replace").split())
    print(f"run with a stuck read ended after {took:.1f} s (limit 6 s per step)")
    assert rc == HANG_EXIT_CODE, text[-3000:]
    assert "error: rank 0: no optimizer step finished for" in text and "stuck in data at step 4" in text, text[-3000:]
    assert f"has been reading {stuck} (sample" in text and "loader worker" in text, text[-3000:]
    assert "stacks of every thread in" in text and (out / "hang-rank0.txt").is_file(), text[-3000:]
    assert str(stuck) in (out / "hang-rank0.txt").read_text()
    # no worker outlives the run (the stuck one included), and the last checkpoint is intact
    time.sleep(0.5)
    assert not [w for w in workers if alive(w)], workers
    last = ckpt.find_valid_checkpoint(out / "checkpoints")
    assert last is not None and last.name == ckpt.step_dir_name(3), last
    assert f"the last good checkpoint {last} stays resumable" in text


def test_a_fifo_in_place_of_a_medium_is_skipped_never_opened(mini_data, tmp_path):
    data = copy_digits(mini_data, tmp_path / "copy")
    fifo = media_of_draw(data, TASK, BATCH, SEED, draw=1)[0]
    fifo.unlink()
    os.mkfifo(fifo)  # opening it for reading would block forever: no writer ever comes
    raw = small_recipe(TASKS, train={"max_steps": 3, "ckpt_every": 0, "seed": SEED, "step_timeout_s": 20})
    began = time.monotonic()
    result = train(recipe_from_dict(raw), output=tmp_path / "run", data_dir=data, log=lambda m: None)
    print(f"3 steps with a FIFO medium in {time.monotonic() - began:.1f} s")
    assert result.step == 3 and result.skipped_media == {TASK: {"bad_format_media": 1}}, result.skipped_media
