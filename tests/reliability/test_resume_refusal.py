"""A run whose checkpoints are ALL damaged: `--resume auto` must refuse to start from step 0 (that
would silently throw the run away), with one line naming each damaged checkpoint and why, and
exit non-zero without touching the run folder; `--resume never` is how a user chooses to start
over (the damaged checkpoints are moved aside, not deleted).

The fault is real: every checkpoint of a real run on the mini data has one bit flipped in its
weights (a bad disk), detected by the checksum list in its meta.json.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from uniperceiver.config import recipe_from_dict
from uniperceiver.engine import train_checkpoint as ckpt
from uniperceiver.engine.trainer import train

from .conftest import invoke, small_recipe, write_recipe

TASKS = [{"name": "mini-digits", "batch_size": 8, "sample_weight": 1.0}]


def _flip_one_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def damaged_run(mini_data, tmp_path_factory) -> Iterator[Path]:
    """A 3-step run with a checkpoint after every step, then every checkpoint's weights bit-flipped."""
    out = tmp_path_factory.mktemp("all-damaged") / "run"
    raw = small_recipe(TASKS, train={"max_steps": 3, "ckpt_every": 1})
    assert train(recipe_from_dict(raw), output=out, data_dir=mini_data, log=lambda m: None).step == 3
    shutil.rmtree(out / "final")  # the run was "interrupted" before its end: only checkpoints remain
    steps = ckpt.list_checkpoints(out / "checkpoints")
    assert len(steps) == 3
    for step in steps:
        _flip_one_bit(step / "model.dcp" / "__0_0.distcp")
    yield out
    shutil.rmtree(out.parent, ignore_errors=True)  # module done: free its disk now, not at session end


def test_resume_auto_refuses_to_restart_when_every_checkpoint_is_damaged(damaged_run, mini_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(damaged_run, run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    metrics = (run / "metrics.csv").read_bytes()
    recipe = write_recipe(tmp_path / "r.yaml", small_recipe(TASKS, train={"max_steps": 5, "ckpt_every": 1}))
    began = time.monotonic()
    res = invoke(["pretrain", recipe, "--data-dir", mini_data, "--output", run, "--resume", "auto", "--device", "cpu"])
    took = time.monotonic() - began
    print(f"--resume auto refused in {took:.1f} s")
    assert res.exception is None and res.exit_code == 1, res.output[-2000:]
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.output, res.output[-2000:]
    text = res.flat
    for name in ("step-000001", "step-000002", "step-000003"):
        assert name in text, text
    assert text.count("__0_0.distcp: xxh3_128 checksum") == 3 and "--resume never" in text, text
    assert "starting from scratch" not in text and "step 1/" not in text, text
    # nothing was trained or written: the same files, the same metrics
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert (run / "metrics.csv").read_bytes() == metrics


def test_resume_never_starts_over_and_keeps_the_damaged_checkpoints_aside(damaged_run, mini_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(damaged_run, run)
    recipe = write_recipe(tmp_path / "r.yaml", small_recipe(TASKS, train={"max_steps": 2, "ckpt_every": 1}))
    began = time.monotonic()
    res = invoke(["pretrain", recipe, "--data-dir", mini_data, "--output", run, "--resume", "never", "--device", "cpu"])
    print(f"--resume never trained 2 steps in {time.monotonic() - began:.1f} s")
    assert res.exception is None and res.exit_code == 0, res.output[-2000:]
    aside = run / "checkpoints.discarded-1"
    assert f"moved to {aside}" in res.flat, res.flat[-2000:]
    assert [p.name for p in ckpt.list_checkpoints(aside)] == ["step-000003", "step-000002", "step-000001"]
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step-000002", "step-000001"]
    ckpt.verify_checkpoint(run / "checkpoints" / "step-000002")
    assert (run / "final" / "model.safetensors").is_file()


def test_resume_never_sets_every_stages_checkpoints_aside(mini_data, tmp_path):
    """A multi-stage run restarted with `--resume never`: each `stage-<i>-<name>/checkpoints/` moves aside,
    so the new run neither resumes nor prunes nor mixes with the old checkpoints of any stage."""
    run = tmp_path / "run"
    raw = small_recipe(TASKS, train={"max_steps": 2, "ckpt_every": 1})
    raw["stages"] = [{"name": "low", "set": {}}, {"name": "high", "set": {"train.max_steps": 1}}]
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    first = invoke(["pretrain", recipe, "--data-dir", mini_data, "--output", run, "--device", "cpu"])
    assert first.exception is None and first.exit_code == 0, first.output[-2000:]
    stages = [run / "stage-1-low", run / "stage-2-high"]
    old = {s: [p.name for p in ckpt.list_checkpoints(s / "checkpoints")] for s in stages}
    assert old == {stages[0]: ["step-000002", "step-000001"], stages[1]: ["step-000001"]}

    again = invoke(["pretrain", recipe, "--data-dir", mini_data, "--output", run, "--resume", "never", "--device", "cpu"])
    assert again.exception is None and again.exit_code == 0, again.output[-2000:]
    for stage in stages:
        aside = stage / "checkpoints.discarded-1"
        assert f"moved to {aside}" in again.flat, again.flat[-2000:]
        assert [p.name for p in ckpt.list_checkpoints(aside)] == old[stage]  # kept, not deleted
        assert [p.name for p in ckpt.list_checkpoints(stage / "checkpoints")] == old[stage]  # trained anew
        assert (stage / "final" / "model.safetensors").is_file()
