"""The trainer's parts and its loop, on the real `mini` data with the tiny model.

Covers: AdamW parameter groups (no weight decay on norms, biases, embeddings, logit scales,
LayerScale gammas, prompts, SPE bias, similarity weight), the warm-up + decay schedule at known
steps, the multi-task sampler (stateless task choice, resumable cursors, rank shards), the loader
skipping unreadable media without dying, a short multi-task pre-training run that lowers every
task's loss, and the NaN policies ("stop" names step, task and samples; "skip" counts).
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from uniperceiver.config import recipe_from_dict
from uniperceiver.engine import train_checkpoint as ckpt
from uniperceiver.engine.loader import MultiTaskLoader
from uniperceiver.engine.optim import WarmupSchedule, build_optimizer, lr_at, no_weight_decay, param_groups
from uniperceiver.engine.runs import read_metrics
from uniperceiver.engine.sampler import ResumableBatchSampler, TaskChooser
from uniperceiver.engine.trainer import TrainingDiverged, train
from uniperceiver.errors import DataError
from uniperceiver.modeling import build_model
from uniperceiver.tasks.catalog import build_task, task_config

import sys as _sys
_sys.path.insert(0, str(Path(__file__).parent))
from _trainer_fixtures import mini_data, one_thread  # noqa: E402,F401  (shared fixtures)


def recipe(tasks: list[dict], **sections) -> object:
    raw = {
        "name": "test",
        "model": {"size": "tiny", "overrides": {"depth": 2}},
        "optim": {"lr": 5e-3, "warmup_steps": 3, "weight_decay": 0.0, "min_lr": 1e-5, "clip_grad": 1.0},
        "train": {"max_steps": 6, "ckpt_every": 0, "log_every": 1, "seed": 0},
        "tasks": tasks,
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return recipe_from_dict(raw)


# ------------------------------------------------------------------------------------ optimizer


def test_param_groups_exclude_norms_biases_embeddings_scales_gammas_prompts():
    model = build_model("tiny", prompt_tokens=2, spe_bias=True, cls_head_classes=3)
    groups = param_groups(model, weight_decay=0.2)
    by_name = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert set(by_name) == {n for n, _ in model.named_parameters()}
    no_decay = {n for n, wd in by_name.items() if wd == 0.0}
    decay = {n for n, wd in by_name.items() if wd == 0.2}
    for name in ("embed.norm.weight", "embed.norm.bias", "encoder.blocks.0.norm1.weight", "encoder.blocks.1.norm2.bias",
                 "head.ln_post.weight", "encoder.blocks.0.attn.qkv.bias", "encoder.blocks.3.fc2.bias",
                 "embed.word.weight", "embed.text_pos.weight", "embed.token_type.weight", "embed.temporal_pos.weight",
                 "head.logit_scales.img_cls", "head.logit_scales.retrieve", "encoder.blocks.2.gamma_1",
                 "encoder.blocks.2.gamma_2", "encoder.blocks.0.prompt", "embed.spe_bias", "similarity_weight",
                 "cls_head.bias", "head.proj.bias"):
        assert name in no_decay, name
    assert decay == {n for n in by_name if n.endswith(".weight") and any(
        k in n for k in ("qkv", "attn.out", "fc1", "fc2", "head.proj", "embed.patch", "cls_head"))}
    assert not no_weight_decay("encoder.blocks.0.fc1.weight", torch.zeros(4, 4))

    # frozen parameters are left out; layer-wise decay scales lr by depth
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith("embed."))
    layered = param_groups(model, 0.1, layer_decay=0.5)
    names = {n for g in layered for n in g["param_names"]}
    assert not any(n.startswith("embed.") for n in names)
    scale = {n: g["lr_scale"] for g in layered for n in g["param_names"]}
    depth = model.cfg.depth
    assert scale["encoder.blocks.0.fc1.weight"] == pytest.approx(0.5 ** depth)
    assert scale[f"encoder.blocks.{depth - 1}.fc1.weight"] == pytest.approx(0.5)
    assert scale["head.proj.weight"] == 1.0


def test_schedule_values_at_known_steps():
    base, floor = 1e-3, 1e-5
    assert lr_at(0, base, 10, 110, floor, "cosine") == pytest.approx(1e-4)
    assert lr_at(9, base, 10, 110, floor, "cosine") == pytest.approx(base)
    assert lr_at(10, base, 10, 110, floor, "cosine") == pytest.approx(base)
    assert lr_at(60, base, 10, 110, floor, "cosine") == pytest.approx((base + floor) / 2)
    assert lr_at(110, base, 10, 110, floor, "cosine") == pytest.approx(floor)
    assert lr_at(500, base, 10, 110, floor, "cosine") == pytest.approx(floor)
    assert lr_at(35, base, 10, 110, floor, "linear") == pytest.approx(floor + (base - floor) * 0.75)
    assert lr_at(80, base, 10, 110, floor, "constant") == base
    assert lr_at(0, base, 0, 100, floor, "cosine") == pytest.approx(base)

    model = build_model("tiny", depth=1)
    opt = build_optimizer(model, recipe([{"name": "mini-faces"}], optim={"lr": 1e-3, "warmup_steps": 4}).optim)
    sched = WarmupSchedule(opt, 1e-3, 4, 20, 1e-5, "cosine")
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        sched.step()
    assert seen[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    again = WarmupSchedule(opt, 1e-3, 4, 20, 1e-5, "cosine")
    again.load_state_dict(sched.state_dict())
    assert again.current_lr() == sched.current_lr() == pytest.approx(lr_at(6, 1e-3, 4, 20, 1e-5, "cosine"))


# -------------------------------------------------------------------------------------- sampler


def test_task_choice_is_stateless_seeded_and_weighted():
    chooser = TaskChooser([2.0, 1.0, 1.0], seed=7)
    seq = [chooser.choose(0, d) for d in range(2000)]
    assert seq == [TaskChooser([2.0, 1.0, 1.0], seed=7).choose(0, d) for d in range(2000)]
    assert seq[1234:1240] == [chooser.choose(0, d) for d in range(1234, 1240)]  # no history needed
    assert seq != [chooser.choose(1, d) for d in range(2000)]  # every rank draws its own task
    counts = Counter(seq)
    assert abs(counts[0] / 2000 - 0.5) < 0.05 and abs(counts[1] / 2000 - 0.25) < 0.05
    assert TaskChooser([1.0, 0.0], seed=1).choose(0, 5) == 0


def test_batch_sampler_covers_epochs_resumes_exactly_and_shards_by_rank():
    s = ResumableBatchSampler(10, 4, seed=3, key="t")
    batches = [s.next_batch()[0] for _ in range(5)]  # 20 draws = 2 epochs, batches cross epochs
    flat = [pair for b in batches for pair in b]
    assert sorted(i for e, i in flat if e == 0) == list(range(10))
    assert sorted(i for e, i in flat if e == 1) == list(range(10))
    assert [i for e, i in flat if e == 0] != list(range(10))  # shuffled

    fresh = ResumableBatchSampler(10, 4, seed=3, key="t")
    first = [fresh.next_batch()[0] for _ in range(2)]
    state = fresh.state_dict()
    resumed = ResumableBatchSampler(10, 4, seed=3, key="t")
    resumed.load_state_dict(state)
    assert first + [resumed.next_batch()[0] for _ in range(3)] == batches

    shards = [ResumableBatchSampler(10, 5, seed=3, key="t", rank=r, world_size=2).next_batch()[0] for r in range(2)]
    assert sorted(i for b in shards for _, i in b) == list(range(10))
    assert ResumableBatchSampler(10, 4, seed=3, key="other").next_batch()[0] != batches[0]


def test_loader_skips_unreadable_media_counts_them_and_resumes(mini_data, tmp_path):
    """A copy of mini-faces whose raw root has a truncated, an empty and a missing image."""
    src = mini_data / "mini-faces"
    meta = json.loads((src / "meta.json").read_text())
    raw = tmp_path / "raw"
    rows = [json.loads(line) for line in (src / "train.jsonl").read_text().splitlines()]
    for row in rows:
        dst = raw / row["media"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(meta["raw_root"]) / row["media"], dst)
    (raw / rows[0]["media"]).write_bytes((raw / rows[0]["media"]).read_bytes()[:40])
    (raw / rows[1]["media"]).write_bytes(b"")
    (raw / rows[2]["media"]).unlink()
    data = tmp_path / "data"
    shutil.copytree(src, data / "mini-faces")
    meta["raw_root"] = str(raw)
    (data / "mini-faces" / "meta.json").write_text(json.dumps(meta))

    model = build_model("tiny", depth=1)
    task = build_task(task_config("mini-faces"), data, model.cfg)
    examples = task.examples("train")
    loader = MultiTaskLoader([task], [examples], weights=[1.0], batch_sizes=[10], seed=0)
    seen = []
    for _ in range(len(examples) // 10):  # one epoch: every broken sample comes up once
        item = next(loader)
        seen += item.ids
        assert item.batch is not None and item.batch["pixels"].shape[0] == item.size
    skipped = loader.skipped["mini-faces"]
    assert sum(skipped.values()) == 3 and skipped.get("missing_media") == 1, skipped
    assert len(seen) == len(examples) - 3 and {r["id"] for r in rows[:3]}.isdisjoint(seen)
    state = loader.state_dict()
    expect = [next(loader).ids for _ in range(2)]
    again = MultiTaskLoader([task], [examples], weights=[1.0], batch_sizes=[10], seed=0)
    again.load_state_dict(state)
    assert [next(again).ids for _ in range(2)] == expect
    assert again.skipped == loader.skipped or sum(again.skipped["mini-faces"].values()) >= 3

    # a task whose media are all unreadable is a clear error after one epoch, not a hang
    for row in rows:
        p = raw / row["media"]
        if p.exists():
            p.write_bytes(b"")
    dead = MultiTaskLoader([task], [examples], weights=[1.0], batch_sizes=[10], seed=0)
    with pytest.raises(DataError, match="mini-faces.*no sample could be loaded"):
        for _ in range(100):
            next(dead)


# -------------------------------------------------------------------------------------- the loop


def test_pretraining_a_few_tasks_lowers_each_loss(mini_data, tmp_path):
    rec = recipe(
        [{"name": "mini-faces", "batch_size": 16},
         {"name": "mini-photos-retrieval", "batch_size": 8},
         {"name": "mini-photos-caption", "batch_size": 8}],  # vocabulary targets (corpus ids)
        # 60 steps (17 of them mini-faces at seed 0): at 42 steps the binary faces loss was still
        # within its step-to-step noise, and rounding-level changes (fused vs foreach AdamW) flipped it.
        train={"max_steps": 60},
    )
    result = train(rec, output=tmp_path / "run", data_dir=mini_data, log=lambda m: None)
    assert result.step == 60 and not result.interrupted
    by_task: dict[str, list[float]] = {}
    for _, name, loss in result.history:
        by_task.setdefault(name, []).append(loss)
    assert set(by_task) == {"mini-faces", "mini-photos-retrieval", "mini-photos-caption"}
    for name, losses in by_task.items():
        k = max(2, len(losses) // 3)
        first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
        print(f"{name}: {len(losses)} steps, first {first:.3f} -> last {last:.3f}")
        assert last < first - 0.05, (name, losses)
    run = result.run_dir
    assert (run / "recipe.yaml").is_file() and (run / "curves.png").stat().st_size > 1000
    assert (run / "final" / "model.safetensors").is_file()
    rows = read_metrics(run)
    assert {r["task"] for r in rows if r["name"] == "loss"} >= {"", "mini-faces", "mini-photos-caption"}
    assert any(r["name"] == "lr" for r in rows) and any(r["name"] == "grad_norm" for r in rows)
    latest = ckpt.find_valid_checkpoint(run / "checkpoints")
    assert latest is not None and latest.name == "step-000060"


def _poison_at(step_to_poison: int):
    """An evaluation hook that corrupts the weights at one step: a divergence seen by the next step."""

    def hook(model, tasks, step):
        if step == step_to_poison:
            with torch.no_grad():
                model.head.proj.weight.fill_(float("nan"))
        return {}

    return hook


def test_nan_loss_stops_naming_step_task_and_samples_and_keeps_last_checkpoint(mini_data, tmp_path):
    rec = recipe([{"name": "mini-faces", "batch_size": 4}],
                 train={"max_steps": 6, "ckpt_every": 2, "eval_every": 1, "nan_policy": "stop"})
    with pytest.raises(TrainingDiverged) as err:
        train(rec, output=tmp_path / "run", data_dir=mini_data, evaluate=_poison_at(3), log=lambda m: None)
    msg = str(err.value)
    assert "step 4" in msg and "'mini-faces'" in msg and "face-" in msg, msg
    assert "step-000002" in msg
    good = ckpt.find_valid_checkpoint(tmp_path / "run" / "checkpoints")
    assert good is not None and good.name == "step-000002"
    state = ckpt.load_checkpoint(good)
    assert all(torch.isfinite(v).all() for v in state.model_state.values())


def test_nan_policy_skip_counts_skipped_steps(mini_data, tmp_path):
    rec = recipe([{"name": "mini-faces", "batch_size": 4}],
                 train={"max_steps": 5, "eval_every": 1, "nan_policy": "skip"})
    result = train(rec, output=tmp_path / "run", data_dir=mini_data, evaluate=_poison_at(2), log=lambda m: None)
    assert result.step == 5 and result.skipped_steps == 3
    assert [math.isfinite(v) for _, _, v in result.history] == [True, True, False, False, False]


def test_loader_workers_follow_the_same_plan_and_resume_from_consumed_state(mini_data):
    model = build_model("tiny", depth=1)
    tasks = [build_task(task_config(n), mini_data, model.cfg) for n in ("mini-faces", "mini-photos-retrieval")]
    examples = [t.examples("train") for t in tasks]

    def run(workers: int, n: int, state: dict | None = None):
        loader = MultiTaskLoader(tasks, examples, weights=[1.0, 1.0], batch_sizes=[4, 4], seed=1, num_workers=workers)
        if state is not None:
            loader.load_state_dict(state)
        items = [next(loader) for _ in range(n)]
        out = [(i.spec.task, i.ids, i.batch["pixels"]) for i in items]
        saved = loader.state_dict()
        loader.close()
        return out, saved

    single, _ = run(0, 6)
    first, state = run(2, 3)  # workers prefetch ahead; the state counts only what was taken
    assert state["draw"] == 3
    rest, _ = run(2, 3, state)
    assert len({t for t, _, _ in single}) == 2
    for (ta, ia, pa), (tb, ib, pb) in zip(single, first + rest):
        assert ta == tb and ia == ib and torch.equal(pa, pb)


def test_grad_accumulation_and_bf16_autocast_on_cpu(mini_data, tmp_path):
    rec = recipe([{"name": "mini-faces", "batch_size": 4}, {"name": "mini-photos-retrieval", "batch_size": 4}],
                 train={"max_steps": 2, "grad_accum": 2, "precision": "bf16"})
    result = train(rec, output=tmp_path / "run", data_dir=mini_data, log=lambda m: None)
    assert [s for s, _, _ in result.history] == [1, 1, 2, 2]
    assert all(math.isfinite(v) for _, _, v in result.history)
    state = ckpt.load_checkpoint(ckpt.find_valid_checkpoint(tmp_path / "run" / "checkpoints"))
    assert state.rank_state["data"]["draw"] == 4 and state.scheduler["step_count"] == 2
