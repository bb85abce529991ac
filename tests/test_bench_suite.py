"""The benchmark suite's bookkeeping: which cases pair up, the order rounds run in, how ratios and
memory figures are computed. Timings themselves are not asserted (machines are noisy)."""

from __future__ import annotations

import math

import pytest
import torch

from uniperceiver.bench.suite import StepPair, median_ratio, round_order, step_pairs
from uniperceiver.bench.train_step import StepCase, run_step_case


def test_quick_pairs_compare_base_with_bert_and_timm() -> None:
    pairs = step_pairs(quick=True, sizes=["base"])
    assert [(p.ours["kind"], p.theirs["impl"]) for p in pairs] == [("text", "bert"), ("image", "timm-vit")]
    for p in pairs:
        same_shape = {k: v for k, v in p.ours.items() if k != "impl"}
        assert {k: v for k, v in p.theirs.items() if k != "impl"} == same_shape
    full = step_pairs(quick=False, sizes=["tiny", "base"])
    kinds = [(p.ours["size"], p.ours["kind"], p.theirs and p.theirs["impl"]) for p in full]
    assert ("base", "video", None) in kinds and ("tiny", "caption", None) in kinds
    assert all(p.rounds == 3 for p in full)


def test_rounds_alternate_abba() -> None:
    ours, theirs = {"impl": "ours"}, {"impl": "bert"}
    order = round_order(StepPair(ours, theirs, rounds=3))
    assert [(r, s["impl"]) for r, s in order] == [
        (0, "ours"), (0, "bert"), (1, "bert"), (1, "ours"), (2, "ours"), (2, "bert")]
    assert [s["impl"] for _, s in round_order(StepPair(ours, None, rounds=2))] == ["ours", "ours"]


def test_ratio_is_the_median_of_per_round_throughput_ratios() -> None:
    # ours 1.0 s vs theirs 1.2 s, then a noisy round, then 2.0 vs 2.2: per-round ratios 1.2, 0.5, 1.1.
    assert median_ratio([1.0, 4.0, 2.0], [1.2, 2.0, 2.2]) == pytest.approx(1.1)
    with pytest.raises(ValueError, match="one time per round"):
        median_ratio([1.0], [1.0, 2.0])


def test_memory_case_reports_its_pass_and_flops() -> None:
    case = StepCase(impl="ours", size="tiny", kind="text", batch=2, text_len=16, measure_memory=True)
    res = run_step_case(case, torch.device("cpu"), warmup=0, repeats=0)
    assert res.fwd_bwd_s > 0 and res.median_s == res.fwd_bwd_s
    assert res.fwd_bwd_peak_bytes >= res.fwd_bwd_mem_bytes >= 0
    assert res.flops_per_step > 0 and math.isclose(res.achieved_flops, res.flops_per_step / res.median_s)
    with pytest.raises(ValueError, match="measure_memory"):
        run_step_case(StepCase(impl="ours", size="tiny", kind="text", batch=2, text_len=16),
                      torch.device("cpu"), warmup=0, repeats=0)


def test_image_text_pair_case_counts_both_encodes() -> None:
    """The retrieval case encodes images and captions separately: its FLOPs are one image step plus one
    text step, and the contrastive loss trains (its gradient reaches the patch embedding and the words)."""
    from uniperceiver.bench.flops import train_step_flops
    from uniperceiver.bench.train_step import BUILDERS
    from uniperceiver.modeling.model_config import model_config

    case = StepCase(impl="ours", size="tiny", kind="retrieval", batch=3, frames=1, text_len=8)
    res = run_step_case(case, torch.device("cpu"), warmup=0, repeats=1)
    cfg = model_config("tiny", image_size=case.image_size)  # the case's 224 px, not tiny's default
    assert res.flops_per_step == train_step_flops(cfg, 3, frames=1) + train_step_flops(cfg, 3, text_len=8)
    model, loss_fn, seq = BUILDERS["ours"](case, torch.device("cpu"))
    assert seq == (1 + cfg.grid_size**2) + (1 + 8)
    loss = loss_fn()
    assert loss.item() > 0
    loss.backward()
    assert model.embed.patch.weight.grad.abs().sum() > 0 and model.embed.word.weight.grad.abs().sum() > 0
    assert any(p.ours["kind"] == "retrieval" for p in step_pairs(quick=False, sizes=["base"]))


def test_gpu_shapes_rounds_kinds_and_compile_flags() -> None:
    from uniperceiver.bench.suite import GPU_SHAPES
    from uniperceiver.errors import UpctlError

    gpu = step_pairs(quick=False, sizes=["base"], device_type="cuda", rounds=2, compile=True, kinds=["image", "retrieval"])
    assert [(p.ours["kind"], p.theirs and p.theirs["impl"]) for p in gpu] == [("image", "timm-vit"), ("retrieval", None)]
    assert gpu[0].ours["batch"] == gpu[0].theirs["batch"] == GPU_SHAPES["image"]
    assert all(p.rounds == 2 and p.ours["compile"] for p in gpu) and gpu[0].theirs["compile"]
    assert step_pairs(quick=True, sizes=["base"], device_type="cuda")[0].ours["batch"] == GPU_SHAPES["text"][0]
    with pytest.raises(UpctlError, match="unknown step kind"):
        step_pairs(quick=False, sizes=["base"], kinds=["audio"])
    with pytest.raises(UpctlError, match="--rounds 0"):
        step_pairs(quick=False, sizes=["base"], rounds=0)
