"""Hangs and dead peers under `torchrun --nproc_per_node 2` (gloo on CPU) running `upctl pretrain`.

- A rank that hangs without dying: rank 1's next image is a file whose open() blocks (a write
  lease the test never gives up: a read on a dead network mount), so rank 1 waits in its data
  phase and rank 0 waits for it inside a collective. With `train.step_timeout_s` 8 s and the
  collective timeout (`train.collective_timeout_s`) at 600 s, the step watchdog must end the job
  long before the collective timeout, each rank naming its phase (rank 1: data, and the file;
  rank 0: the collective, and what rank 1 last reported), stacks written, the last checkpoint intact.
- A rank that dies (SIGKILL): every surviving rank prints one line, not a gloo traceback.
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

from ._blocking import blocked_open, copy_digits, media_of_draw
from .conftest import LAUNCHER_SOURCE, small_recipe, subprocess_env, write_recipe
from .test_distributed_faults import _workers

TASK = "mini-digits"
BATCH = 8
SEED = 0
TASKS = [{"name": TASK, "batch_size": BATCH, "sample_weight": 1.0}]


def _torchrun(tmp: Path, recipe: Path, data: Path, out: Path, *extra: str) -> list[str]:
    launcher = tmp / "upctl_launch.py"
    launcher.write_text(LAUNCHER_SOURCE)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *extra,
            str(launcher), "pretrain", str(recipe), "--data-dir", str(data), "--output", str(out), "--device", "cpu"]


def _job_with_a_stuck_rank(mini_data: Path, tmp_path: Path, train: dict, limit_s: float
                           ) -> tuple[subprocess.CompletedProcess, str, float, Path, Path]:
    """Run a 2-rank job whose rank 1 blocks opening its image of draw 2 (step 3); (proc, text, seconds, file, run)."""
    data = copy_digits(mini_data, tmp_path / "copy")
    stuck = media_of_draw(data, TASK, BATCH, SEED, draw=2, rank=1, world_size=2)[0]
    raw = small_recipe(TASKS, train={"max_steps": 20, "ckpt_every": 1, "seed": SEED, **train})
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    out = tmp_path / "run"
    with blocked_open(stuck):
        began = time.monotonic()
        try:
            proc = subprocess.run(_torchrun(tmp_path, recipe, data, out), cwd=tmp_path, env=subprocess_env(tmp_path),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=limit_s)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"the job still ran {limit_s:.0f} s after start (hang)\n{str(exc.stdout)[-3000:]}")
        took = time.monotonic() - began
    return proc, " ".join(proc.stdout.split()), took, stuck, out


@pytest.mark.slow
def test_a_rank_stuck_in_a_read_ends_the_job_naming_each_rank_and_its_phase(mini_data, tmp_path):
    proc, text, took, stuck, out = _job_with_a_stuck_rank(
        mini_data, tmp_path, {"step_timeout_s": 8, "collective_timeout_s": 600}, limit_s=120)
    print(f"job with a stuck rank ended after {took:.1f} s (step limit 8 s, collective timeout 600 s)")
    assert proc.returncode != 0, text[-4000:]
    # rank 1 names its phase and the file it is stuck on
    assert "error: rank 1: no optimizer step finished for" in text and "stuck in data at step 3" in text, text[-4000:]
    assert f"the main process has been reading {stuck}" in text, text[-4000:]
    # rank 1 also says what rank 0 was doing (through the launcher's store)
    assert re.search(r"rank 0 at step 2 in [\w/]+ for \d+ s, alive", text), text[-4000:]
    # rank 0 names the collective it waits in and what rank 1 last said, or says in one line that its
    # peer is gone, or (rank 1 ended first) torchrun stopped it while it waited
    waited = re.search(r"error: rank 0: no optimizer step finished .*? stuck in a collective \(\w+", text)
    lost = "error: rank 0: another rank of this 2-rank job died or stopped answering" in text
    stopped = re.search(r"rank\s*:\s*0 \(local_rank: 0\) exitcode\s*:\s*-15", text)
    assert waited or lost or stopped, text[-4000:]
    if waited:
        assert "rank 1 at step 2 in data" in text, text[-4000:]
    assert (out / "hang-rank1.txt").is_file() and str(stuck) in (out / "hang-rank1.txt").read_text()
    assert re.search(r"exitcode\s*:\s*124", text), text[-4000:]  # torchrun's report: the watchdog's status
    last = ckpt.find_valid_checkpoint(out / "checkpoints")
    assert last is not None and last.name == ckpt.step_dir_name(2), last
    assert took < 60, took


@pytest.mark.slow
def test_without_the_step_watchdog_the_collective_timeout_ends_the_job(mini_data, tmp_path):
    """`train.collective_timeout_s` reaches the process group: with the step watchdog off, rank 0 waits for the
    stuck rank 1 inside a collective and gloo gives up after 10 s (not the default 1,800 s), one line naming it.
    Rank 1's blocked open would only return when the kernel breaks the lease (lease-break-time, >= 30 s here)."""
    proc, text, took, _, out = _job_with_a_stuck_rank(mini_data, tmp_path, {"collective_timeout_s": 10}, limit_s=240)
    print(f"job with a stuck rank and no step watchdog ended after {took:.1f} s (collective timeout 10 s)")
    assert proc.returncode != 0, text[-4000:]
    assert "error: rank 0: another rank of this 2-rank job died or stopped answering (gloo:" in text, text[-4000:]
    assert re.search(r"error: rank 0: [^;]*Timed out waiting 10000ms", text), text[-4000:]  # the configured 10 s
    assert "no optimizer step finished" not in text, text[-4000:]  # the watchdog was off: gloo's timeout ended it
    assert ckpt.find_valid_checkpoint(out / "checkpoints").name == ckpt.step_dir_name(2)
    # Rank 0 gives up 10 s into the collective; rank 1, stuck in the kernel, ends when the launcher kills it.
    assert took < 120, took


@pytest.mark.slow
def test_every_surviving_rank_says_one_line_when_a_peer_dies(mini_data, tmp_path):
    raw = small_recipe(TASKS, train={"max_steps": 40, "ckpt_every": 2, "seed": SEED})
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    out, logs = tmp_path / "run", tmp_path / "logs"
    cmd = _torchrun(tmp_path, recipe, mini_data, out, "--log-dir", str(logs), "--redirects", "3")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        end = time.monotonic() + 120
        while not (out / "checkpoints" / ckpt.step_dir_name(2) / ckpt.META_NAME).is_file():
            assert proc.poll() is None and time.monotonic() < end, proc.communicate()[0][-3000:]
            time.sleep(0.05)
        workers = _workers(proc.pid, tmp_path / "upctl_launch.py")
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGKILL)
        killed = time.monotonic()
        report, _ = proc.communicate(timeout=90)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"job ended {took:.1f} s after rank 1 was killed")
    assert proc.returncode != 0, report[-3000:]
    (rank0,) = list(logs.rglob("0/stderr.log"))
    said = rank0.read_text(errors="replace")
    errors = [line for line in said.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: rank 0: another rank of this 2-rank job died"), said[-3000:]
    assert "Connection closed by peer" in errors[0] and "pair.cc" not in said, said[-3000:]
    assert "Traceback" not in said and 'File "' not in said, said[-3000:]
