"""Numerical faults: a NaN injected into ONE sample of one batch (its pixels) of a two-task run.

nan_policy "stop": the run ends with one line naming the step, the task and the sample, and the
checkpoints on disk (weights and optimizer state) stay finite, the last one being the step before.
nan_policy "skip": that step is skipped and counted, the run finishes, every weight stays finite.
The poisoned step is computed from the seeded sampling plan, so the message can be checked exactly.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from uniperceiver.engine import train_checkpoint as ckpt
from uniperceiver.engine.sampler import ResumableBatchSampler, TaskChooser
from uniperceiver.modeling.model_config import model_config
from uniperceiver.tasks.catalog import build_task, task_config
from uniperceiver.tasks.classification import ImageClassification

from .conftest import SMALL_MODEL, invoke, small_recipe, write_recipe

TASKS = [{"name": "mini-faces", "batch_size": 8}, {"name": "mini-digits", "batch_size": 8}]
SEED = 0
STEPS = 6


def _poison_plan(data_dir: Path) -> tuple[int, str, str]:
    """(step, task, sample id): the first sample of the first mini-digits draw at step >= 3."""
    cfg = model_config("tiny", **SMALL_MODEL)
    rows = {t["name"]: build_task(task_config(t["name"]), data_dir, cfg).examples("train") for t in TASKS}
    chooser = TaskChooser([1.0, 1.0], SEED)
    samplers = [ResumableBatchSampler(len(rows[t["name"]]), t["batch_size"], seed=SEED, key=t["name"]) for t in TASKS]
    for draw in range(STEPS):
        t = chooser.choose(0, draw)
        batch, _ = samplers[t].next_batch()
        if draw >= 2 and TASKS[t]["name"] == "mini-digits":
            return draw + 1, "mini-digits", str(rows["mini-digits"][batch[0][1]]["id"])
    raise AssertionError("mini-digits is never drawn at steps 3..6 with this seed; pick another")


def _inject_nan(monkeypatch, sample_id: str) -> list[int]:
    """Wrap ImageClassification.load: that one sample's pixels become NaN (both tasks use the class)."""
    real = ImageClassification.load
    hits: list[int] = []

    def load(self, sample, *, train, rng):
        item = real(self, sample, train=train, rng=rng)
        if str(sample.get("id")) == sample_id:
            item["pixels"] = torch.full_like(item["pixels"], float("nan"))
            hits.append(1)
        return item

    monkeypatch.setattr(ImageClassification, "load", load)
    return hits


def _all_finite(state: dict) -> bool:
    for value in state.values():
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            return False
        if isinstance(value, dict) and not _all_finite(value):
            return False
    return True


@pytest.fixture(scope="module")
def poison(mini_data) -> tuple[int, str, str]:
    return _poison_plan(mini_data)


@pytest.fixture(scope="module")
def stopped_run(mini_data, poison, tmp_path_factory):
    """`upctl pretrain` (in-process) with nan_policy=stop and the poisoned sample."""
    tmp = tmp_path_factory.mktemp("nan-stop")
    with pytest.MonkeyPatch.context() as mp:
        hits = _inject_nan(mp, poison[2])
        recipe = write_recipe(tmp / "nan.yaml", small_recipe(TASKS, train={"max_steps": STEPS, "seed": SEED,
                                                                            "nan_policy": "stop"}))
        out = tmp / "run"
        res = invoke(["pretrain", recipe, "--data-dir", mini_data, "--output", out, "--device", "cpu"])
    assert hits, "the poisoned sample was never loaded: the plan computation is wrong"
    yield res, out
    shutil.rmtree(tmp, ignore_errors=True)  # module done: free its disk now, not at session end


def test_nan_in_one_batch_stops_naming_step_and_task_and_keeps_checkpoints_finite(stopped_run, poison):
    step, task, sample = poison
    res, out = stopped_run
    assert res.exception is None and res.exit_code == 1, res.output[-2000:]
    msg = res.flat
    assert f"error: step {step}: task '{task}' gave a non-finite loss (nan)" in msg, msg[-1500:]
    assert "Traceback" not in res.output
    found = ckpt.find_valid_checkpoint(out / "checkpoints")
    assert found is not None and found.name == ckpt.step_dir_name(step - 1)
    assert ckpt.step_dir_name(step - 1) in msg  # the message points at the last good checkpoint
    assert not (out / "checkpoints" / ckpt.step_dir_name(step)).exists()
    for path in ckpt.list_checkpoints(out / "checkpoints"):
        state = ckpt.load_checkpoint(path)
        assert _all_finite(state.model_state), f"{path}: non-finite weights"
        assert _all_finite(state.optimizer["state"]), f"{path}: non-finite optimizer state"


def test_nan_stop_message_names_the_poisoned_sample(stopped_run, poison):
    res, _ = stopped_run
    assert poison[2] in res.flat, res.flat[-1000:]


def test_nan_stop_with_asynchronous_saves_publishes_the_save_in_writing_first(mini_data, poison, tmp_path,
                                                                             monkeypatch):
    """On a GPU the previous step's checkpoint is still being written in the background when the
    non-finite loss comes: it is published before stopping, so the last good checkpoint is the same
    step as with synchronous saves (it used to be dropped, leaving the one before it)."""
    step, task, _ = poison
    _inject_nan(monkeypatch, poison[2])
    monkeypatch.setattr(ckpt, "wants_async", lambda model: True)
    recipe = write_recipe(tmp_path / "nan.yaml", small_recipe(TASKS, train={"max_steps": STEPS, "seed": SEED,
                                                                             "nan_policy": "stop"}))
    out = tmp_path / "run"
    res = invoke(["pretrain", recipe, "--data-dir", mini_data, "--output", out, "--device", "cpu"])
    assert res.exit_code == 1 and f"error: step {step}: task '{task}' gave a non-finite loss" in res.flat, res.flat[-1500:]
    found = ckpt.find_valid_checkpoint(out / "checkpoints")
    assert found is not None and found.name == ckpt.step_dir_name(step - 1)
    assert f"the last good checkpoint is {found}" in res.flat, res.flat[-1500:]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert _all_finite(ckpt.load_checkpoint(found).model_state)


def test_nan_policy_skip_skips_exactly_that_step_and_finishes_finite(mini_data, poison, tmp_path, monkeypatch):
    step, task, sample = poison
    _inject_nan(monkeypatch, sample)
    recipe = write_recipe(tmp_path / "skip.yaml", small_recipe(TASKS, train={"max_steps": STEPS, "seed": SEED,
                                                                              "nan_policy": "skip"}))
    out = tmp_path / "run"
    res = invoke(["pretrain", recipe, "--data-dir", mini_data, "--output", out, "--device", "cpu"])
    assert res.exception is None and res.exit_code == 0, res.output[-2000:]
    msg = res.flat
    assert f"step {step}: non-finite" in msg and "skipped 1 non-finite step(s)" in msg, msg[-1500:]
    last = ckpt.find_valid_checkpoint(out / "checkpoints")
    assert last is not None and last.name == ckpt.step_dir_name(STEPS)
    state = ckpt.load_checkpoint(last)
    assert state.trainer["skipped_steps"] == 1
    assert _all_finite(state.model_state) and _all_finite(state.optimizer["state"])
    from safetensors.torch import load_file

    assert _all_finite(load_file(str(out / "final" / "model.safetensors")))
    # the poisoned step logged no loss for its task (nothing non-finite reaches the curve), the others did
    from uniperceiver.engine.runs import iter_step_losses

    logged = {(s, t) for s, t, v in iter_step_losses(out) if math.isfinite(v)}
    assert (step, task) not in logged and (step, "") not in logged
    assert {s for s, t in logged if t == ""} == set(range(1, STEPS + 1)) - {step}
