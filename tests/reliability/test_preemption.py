"""Pre-emption: `upctl pretrain recipes/tiny.yaml` killed (SIGKILL) and stopped (SIGTERM) at random
points, including in the middle of a checkpoint write, then restarted with `--resume auto` until it
finishes. The result must equal the uninterrupted run (`reference_run`) bit for bit on CPU: final
weights, every step's checkpoint (weights, step, data cursors) and the loss curve in metrics.csv.

The kill points are drawn from a seeded RNG (RELIABILITY_SEED, printed on failure) so a failing
schedule can be replayed.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from uniperceiver.engine import train_checkpoint as ckpt

from .conftest import (
    RUN_STEPS,
    assert_same_tensors,
    load_weights,
    loss_curve,
    pretrain_args,
    rank_state,
    small_recipe,
    start_upctl,
    subprocess_env,
    trainer_state,
)

SEED = int(os.environ.get("RELIABILITY_SEED", "20241127"))

#: (signal, where): "checkpoint-write" = while a `.tmp-step-N` staging folder exists; "step" = a
#: random moment a few steps after the resume point; "after-resume" = right after "resumed from".
PLAN: list[tuple[str, str]] = [
    ("SIGKILL", "checkpoint-write"),  # the very first checkpoint: nothing to resume yet
    ("SIGKILL", "step"),
    ("SIGTERM", "step"),
    ("SIGKILL", "after-resume"),
    ("SIGKILL", "checkpoint-write"),
    ("SIGTERM", "step"),
]

_STEP_LINE = re.compile(r"(?m)^step (\d+)/\d+\s")
_STOPPED = re.compile(r"stopped by SIGTERM at step (\d+)")
_RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")


def _steps_logged(log: Path) -> int:
    text = log.read_text(errors="replace") if log.is_file() else ""
    found = [int(m) for m in _STEP_LINE.findall(text)]
    return max(found) if found else 0


def _newest_valid(ckpt_root: Path) -> int:
    found = ckpt.find_valid_checkpoint(ckpt_root, warn=lambda m: None)
    return 0 if found is None else int(ckpt.STEP_RE.match(found.name).group(1))


def _staging(ckpt_root: Path, after: int, ignore: set[tuple[str, int]] = frozenset()) -> list[Path]:
    """Staging folders `.tmp-step-N` with N > after, except leftovers (name, inode) seen before."""
    if not ckpt_root.is_dir():
        return []
    out = []
    for p in ckpt_root.glob(".tmp-step-*"):
        try:
            key = (p.name, p.stat().st_ino)
        except FileNotFoundError:
            continue
        if int(p.name.rsplit("-", 1)[1]) > after and key not in ignore:
            out.append(p)
    return out


def _leftovers(ckpt_root: Path) -> set[tuple[str, int]]:
    return {(p.name, p.stat().st_ino) for p in _staging(ckpt_root, -1)}


@dataclass
class Interruption:
    sig: str
    where: str
    resumed_at: int
    detail: str


def _wait_for(cond: Callable[[], bool], proc: subprocess.Popen, log: Path, what: str, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}; seed {SEED}\n"
                        + log.read_text(errors="replace")[-3000:])
        time.sleep(0.003)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}; seed {SEED}\n" + log.read_text(errors="replace")[-3000:])


@dataclass
class InterruptedRun:
    out: Path
    interruptions: list[Interruption]


@pytest.fixture(scope="module")
def interrupted_run(mini_data, tmp_path_factory) -> Iterator[InterruptedRun]:
    """The reference command, interrupted at every point of PLAN and resumed until it finishes."""
    rnd = random.Random(SEED)
    work = tmp_path_factory.mktemp("preempted")
    out = work / "run"
    ckpt_root = out / "checkpoints"
    env = subprocess_env(work)
    args = pretrain_args(mini_data, out)
    done: list[Interruption] = []

    launches = 0
    for sig, where in PLAN:
        for attempt in range(3):  # a kill aimed at a checkpoint write may land just after the rename
            resumed_at = _newest_valid(ckpt_root)
            if resumed_at >= RUN_STEPS - 4:
                pytest.fail(f"the schedule ran out of steps at {resumed_at}; raise RUN_STEPS (seed {SEED})")
            before = _leftovers(ckpt_root)
            log = work / f"launch-{launches}.log"
            launches += 1
            proc = start_upctl(args, work, env, log)
            try:
                if where == "checkpoint-write":
                    _wait_for(lambda: bool(_staging(ckpt_root, resumed_at, before)), proc, log, "a checkpoint write")
                    proc.send_signal(getattr(signal, sig))
                    detail = "during a checkpoint write"
                elif where == "after-resume":
                    _wait_for(lambda: "resumed from" in log.read_text(errors="replace"), proc, log,
                              "the resume message")
                    time.sleep(rnd.uniform(0.0, 1.0))
                    proc.send_signal(getattr(signal, sig))
                    detail = "just after resuming"
                else:
                    target = min(resumed_at + rnd.randint(1, 3), RUN_STEPS - 3)
                    _wait_for(lambda: _steps_logged(log) >= target, proc, log, f"step {target}")
                    time.sleep(rnd.uniform(0.0, 0.4))
                    proc.send_signal(getattr(signal, sig))
                    detail = f"after step {target}"
                rc = proc.wait(timeout=120)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            staged = [p.name for p in _staging(ckpt_root, resumed_at, before)]
            if where != "checkpoint-write" or staged:
                break
        text = log.read_text(errors="replace")
        if resumed_at:
            m = _RESUMED.search(text)
            if where != "after-resume" or m:
                assert m and int(m.group(2)) == resumed_at, text[-2000:]
                assert m.group(1).endswith(ckpt.step_dir_name(resumed_at)), text[-2000:]
        if sig == "SIGKILL":
            assert rc == -signal.SIGKILL, (rc, text[-2000:])
            if where == "checkpoint-write":
                # the kill landed inside the write: the half-written folder is still there under its
                # temporary name only, and the newest valid checkpoint is an older one
                assert staged, f"three kills in a row missed the checkpoint write (seed {SEED})"
                assert _newest_valid(ckpt_root) < int(staged[0].rsplit("-", 1)[1])
                detail += f" ({', '.join(staged)} left half-written)"
        else:
            # SIGTERM: a checkpoint of the step reached is saved, `latest` names it, exit code 143
            assert rc == 143, (rc, text[-2000:])
            m = _STOPPED.search(" ".join(text.split()))
            assert m, text[-2000:]
            stopped = int(m.group(1))
            saved = ckpt_root / ckpt.step_dir_name(stopped)
            ckpt.verify_checkpoint(saved)
            assert (ckpt_root / ckpt.LATEST_NAME).read_text().strip() == saved.name
            assert trainer_state(saved)["step"] == stopped > resumed_at
            detail += f", saved {saved.name}"
        done.append(Interruption(sig, where, resumed_at, detail))

    log = work / "launch-final.log"
    resumed_at = _newest_valid(ckpt_root)
    proc = start_upctl(args, work, env, log)
    try:
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text(errors="replace")
    assert rc == 0, text[-3000:]
    assert f"at step {resumed_at}" in text
    print(f"seed {SEED}: " + "; ".join(f"{d.sig} {d.where} (resumed at {d.resumed_at}, {d.detail})" for d in done))
    yield InterruptedRun(out, done)
    shutil.rmtree(work, ignore_errors=True)  # module done: free its disk now, not at session end


@pytest.mark.slow
def test_interruptions_hit_every_kind_of_point(interrupted_run):
    kinds = {(d.sig, d.where) for d in interrupted_run.interruptions}
    assert len(interrupted_run.interruptions) >= 5
    assert ("SIGKILL", "checkpoint-write") in kinds and ("SIGTERM", "step") in kinds
    assert any(d.resumed_at == 0 for d in interrupted_run.interruptions[1:]), "no restart from scratch was exercised"


@pytest.mark.slow
def test_resumed_weights_and_every_checkpoint_equal_the_uninterrupted_run(interrupted_run, reference_run):
    out = interrupted_run.out
    ckpt_root = out / "checkpoints"
    assert_same_tensors(load_weights(out / "final"), load_weights(reference_run / "final"), "final weights")
    for step in range(1, RUN_STEPS + 1):
        mine = ckpt_root / ckpt.step_dir_name(step)
        theirs = reference_run / "checkpoints" / ckpt.step_dir_name(step)
        ckpt.verify_checkpoint(mine)
        assert trainer_state(mine)["step"] == step
        assert_same_tensors(load_weights(mine), load_weights(theirs), f"weights at step {step}")
    # the whole optimizer state (its tensors in the DCP shards, the rest in optimizer.pt)
    final_opt = ckpt.load_checkpoint(ckpt_root / ckpt.step_dir_name(RUN_STEPS)).optimizer
    ref_opt = ckpt.load_checkpoint(reference_run / "checkpoints" / ckpt.step_dir_name(RUN_STEPS)).optimizer
    assert final_opt["state"].keys() == ref_opt["state"].keys()
    for k, st in final_opt["state"].items():
        for name, value in st.items():
            other = ref_opt["state"][k][name]
            assert (torch.equal(value, other) if torch.is_tensor(value) else value == other), (k, name)
    # no half-written checkpoint survives a completed run
    assert not list(ckpt_root.glob(".tmp-step-*"))


@pytest.mark.slow
def test_sampler_state_proves_no_draw_was_seen_twice_or_skipped(interrupted_run, reference_run):
    """The plan of draws is a pure function of the seed, so equal cursors = the same batches."""
    for step in range(1, RUN_STEPS + 1):
        mine = rank_state(interrupted_run.out / "checkpoints" / ckpt.step_dir_name(step))["data"]
        theirs = rank_state(reference_run / "checkpoints" / ckpt.step_dir_name(step))["data"]
        assert mine["draw"] == step, f"step {step}: {mine['draw']} draws consumed (one seen twice or skipped)"
        assert mine == theirs, f"step {step}: data cursors {mine} differ from the uninterrupted run's {theirs}"


@pytest.mark.slow
def test_resumed_loss_curve_equals_the_uninterrupted_run(interrupted_run, reference_run):
    """Also covers a restart from scratch after a kill before the first checkpoint: its old rows go."""
    assert loss_curve(interrupted_run.out) == loss_curve(reference_run)


# ------------------------------------------------------------- SIGTERM at an exact step, in-process


def _sigterm_at(step: int):
    """A progress callback that sends this process a real SIGTERM after `step` (the trainer's handler catches it)."""

    def progress(report) -> None:
        if report.step == step:
            os.kill(os.getpid(), signal.SIGTERM)

    return progress


def _term_and_resume(mini_data, tmp_path, log_every: int) -> tuple[Path, Path]:
    from uniperceiver.config import recipe_from_dict
    from uniperceiver.engine.trainer import train

    tasks = [{"name": "mini-faces", "batch_size": 8}, {"name": "mini-digits", "batch_size": 8}]
    raw = small_recipe(tasks, train={"max_steps": 6, "ckpt_every": 0, "log_every": log_every})
    quiet = lambda message: None  # noqa: E731
    ref = train(recipe_from_dict(raw), output=tmp_path / "ref", data_dir=mini_data, log=quiet)
    first = train(recipe_from_dict(raw), output=tmp_path / "run", data_dir=mini_data, log=quiet,
                  progress=_sigterm_at(3))
    assert first.interrupted and first.step == 3
    assert first.last_checkpoint is not None and first.last_checkpoint.name == ckpt.step_dir_name(3)
    second = train(recipe_from_dict(raw), output=tmp_path / "run", resume="auto", data_dir=mini_data, log=quiet)
    assert second.step == 6 and not second.interrupted
    assert second.resumed_from is not None and second.resumed_from.name == ckpt.step_dir_name(3)
    assert_same_tensors(load_weights(ref.final_dir), load_weights(second.final_dir), "final weights")
    return ref.run_dir, second.run_dir


def test_sigterm_saves_the_step_reached_and_the_resumed_curve_matches(mini_data, tmp_path):
    ref, run = _term_and_resume(mini_data, tmp_path, log_every=1)
    assert loss_curve(run) == loss_curve(ref)


def test_sigterm_inside_a_logging_window_keeps_the_loss_curve(mini_data, tmp_path):
    ref, run = _term_and_resume(mini_data, tmp_path, log_every=2)
    assert loss_curve(run) == loss_curve(ref)
