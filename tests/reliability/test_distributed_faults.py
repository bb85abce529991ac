"""Distributed faults: `torchrun --nproc_per_node 2` (gloo on CPU) running `upctl pretrain`, rank 1
killed with SIGKILL after a checkpoint: the job must end, with a message naming the failed rank,
within a bounded time (no hang in a collective), and the same command with `--resume auto` must
continue from the last checkpoint to the end with both ranks' state.

The trainer has no fault-injection hook (no environment variable makes a rank fail), so the test
kills the worker process from outside, found through /proc by its RANK environment variable.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from uniperceiver.engine import train_checkpoint as ckpt
from uniperceiver.engine.runs import iter_step_losses

from ._blocking import alive, children
from .conftest import LAUNCHER_SOURCE, SMALL_MODEL_SETS, TINY_RECIPE, rank_state, subprocess_env, trainer_state

STEPS = 12
SETS = SMALL_MODEL_SETS + [f"train.max_steps={STEPS}", "train.ckpt_every=2", "train.keep_checkpoints=100",
                           "train.log_every=1"]
#: How long the job may take to notice the dead rank and stop.
END_WITHIN_S = 90


def _workers(root: int, launcher: Path) -> dict[int, int]:
    """rank -> pid of the torchrun workers running `launcher` (any depth below `root`)."""
    found: dict[int, int] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        for child in children(pid):
            todo.append(child)
            try:
                cmdline = (Path("/proc") / str(child) / "cmdline").read_bytes()
                environ = (Path("/proc") / str(child) / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(launcher).encode() not in cmdline:
                continue
            for item in environ:
                if item.startswith(b"RANK="):
                    found[int(item[5:])] = child
    return found


@pytest.mark.slow
def test_a_dead_rank_ends_the_job_with_a_clear_message_and_the_job_resumes(mini_data, tmp_path):
    launcher = tmp_path / "upctl_launch.py"
    launcher.write_text(LAUNCHER_SOURCE)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(launcher),
           "pretrain", str(TINY_RECIPE), "--data-dir", str(mini_data), "--output", str(out), "--device", "cpu",
           "--resume", "auto"]
    for item in SETS:
        cmd += ["--set", item]
    env = subprocess_env(tmp_path)
    log = tmp_path / "first.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 300
        first_ckpt = out / "checkpoints" / ckpt.step_dir_name(4) / ckpt.META_NAME
        while not first_ckpt.is_file():
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < end, "no checkpoint after 300 s"
            time.sleep(0.05)
        workers = _workers(proc.pid, launcher)
        assert sorted(workers) == [0, 1], workers
        assert proc.poll() is None, "the job finished before the fault could be injected"
        os.kill(workers[1], signal.SIGKILL)
        killed = time.monotonic()
        try:
            rc = proc.wait(timeout=END_WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job still runs {END_WITHIN_S} s after rank 1 died (hang)\n"
                        + log.read_text(errors="replace")[-3000:])
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text(errors="replace")
    assert rc != 0, text[-3000:]
    # the failure names the rank and how it died (torchrun's failure report)
    assert re.search(r"rank\s*:\s*1\b", text) and ("SIGKILL" in text or "Signal 9" in text), text[-3000:]
    assert not alive(workers[0]), "rank 0 outlived the job"
    print(f"job ended {took:.1f} s after rank 1 was killed")

    last = ckpt.find_valid_checkpoint(out / "checkpoints")
    assert last is not None
    at = trainer_state(last)["step"]
    assert 4 <= at < STEPS
    again = subprocess.run(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=400)
    assert again.returncode == 0, again.stdout[-3000:]
    assert f"resumed from {last} at step {at}" in again.stdout, again.stdout[-3000:]
    # both ranks finished (torchrun exits 0 only then; each rank's cursors reach the last step below),
    # and only rank 0 prints
    assert again.stdout.count(f"done: step {STEPS}/{STEPS}") == 1, again.stdout[-3000:]
    final = out / "checkpoints" / ckpt.step_dir_name(STEPS)
    ckpt.verify_checkpoint(final)
    assert trainer_state(final)["step"] == STEPS and trainer_state(final)["world_size"] == 2
    for rank in (0, 1):
        assert rank_state(final, rank)["data"]["draw"] == STEPS, rank
    overall = [s for s, task, _ in iter_step_losses(out) if task == ""]
    assert sorted(overall) == list(range(1, STEPS + 1)), overall  # every step logged exactly once
