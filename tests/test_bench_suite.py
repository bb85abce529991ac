"""The benchmark suite's bookkeeping: which cases pair up, the order rounds run in, how ratios and
memory figures are computed. Timings themselves are not asserted (machines are noisy)."""

from __future__ import annotations

import math

import pytest
import torch

from uniperceiver.bench.step_runs import round_order
from uniperceiver.bench.suite import StepPair, median_ratio, step_pairs
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


def test_levers_expand_to_named_cases_with_baselines_only_where_the_targets_need_them() -> None:
    from uniperceiver.bench.suite import case_name, parse_levers
    from uniperceiver.errors import UpctlError

    levers = parse_levers("eager,compiled,step,chunked-loss,stacked:image+retrieval")
    pairs = step_pairs(quick=False, sizes=["base"], device_type="cuda", rounds=1, kinds=["text", "image", "retrieval"],
                       levers=levers)
    got = [(p.lever, case_name(p.ours), p.theirs and case_name(p.theirs)) for p in pairs]
    assert got == [
        ("eager", "ours base text", "bert base text"),
        ("eager", "ours base image", "timm-vit base image"),
        ("eager", "ours base retrieval", None),
        ("compiled", "ours base text compiled", "bert base text compiled"),
        ("compiled", "ours base image compiled", "timm-vit base image compiled"),
        ("compiled", "ours base retrieval compiled", None),
        ("step", "ours base text compiled-step", None),
        ("step", "ours base image compiled-step", None),
        ("step", "ours base retrieval compiled-step", None),
        ("chunked-loss", "ours base retrieval compiled-step chunked-loss", None),  # no loss to chunk elsewhere
        ("stacked", "ours base image compiled-step cuda-graphs bf16-optim", None),
        ("stacked", "ours base retrieval compiled-step cuda-graphs bf16-optim chunked-loss", None),
    ]
    # Every spec is a valid StepCase (the workers build them from these dicts).
    for p in pairs:
        StepCase(**p.ours)
    with pytest.raises(UpctlError, match="unknown lever"):
        parse_levers("step,warp-speed")
    with pytest.raises(UpctlError, match="unknown step kind"):
        parse_levers("graphs:image+audio")
    with pytest.raises(UpctlError, match="not both"):
        step_pairs(quick=True, sizes=["base"], compile=True, levers=levers)


def test_lever_flags_apply_to_our_side_and_baselines_keep_their_setup() -> None:
    pairs = step_pairs(quick=True, sizes=["base"], device_type="cuda", compile=True,
                       overrides={"compile_scope": "step", "cuda_graphs": True})
    ours, theirs = pairs[1].ours, pairs[1].theirs
    assert ours["compile_scope"] == "step" and ours["cuda_graphs"] and ours["compile"]
    assert theirs == {"impl": "timm-vit", "size": "base", "kind": "image", "batch": ours["batch"], "frames": 1,
                      "compile": True}
    assert all(p.theirs is None for p in step_pairs(quick=True, sizes=["base"], baselines=False))


def test_step_case_refuses_levers_that_would_measure_something_else() -> None:
    with pytest.raises(ValueError, match="need compile=True"):
        StepCase(impl="ours", size="tiny", kind="image", batch=2, frames=1, compile_scope="step")
    with pytest.raises(ValueError, match="pairs"):
        StepCase(impl="ours", size="tiny", kind="image", batch=2, frames=1, loss="chunked")
    with pytest.raises(ValueError, match="compile_mode"):
        StepCase(impl="ours", size="tiny", kind="image", batch=2, frames=1, compile=True, compile_mode="fastest")
    with pytest.raises(ValueError, match="measure_memory"):
        StepCase(impl="ours", size="tiny", kind="text", batch=2, text_len=8, cuda_graphs=True, measure_memory=True)
    with pytest.raises(ValueError, match="CUDA"):
        run_step_case(StepCase(impl="ours", size="tiny", kind="text", batch=2, text_len=8, cuda_graphs=True),
                      torch.device("cpu"), warmup=0, repeats=1)


def test_chunked_loss_pair_case_has_the_plain_loss_and_trains() -> None:
    from uniperceiver.bench.train_step import BUILDERS

    losses = []
    for loss in ("plain", "chunked"):
        torch.manual_seed(0)  # the same initial weights for both
        case = StepCase(impl="ours", size="tiny", kind="retrieval", batch=4, frames=1, text_len=8, loss=loss)
        model, loss_fn, _ = BUILDERS["ours"](case, torch.device("cpu"))
        value = loss_fn()
        value.backward()
        assert model.embed.patch.weight.grad.abs().sum() > 0 and model.head.logit_scales["retrieve"].grad != 0
        losses.append(value.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5) and losses[0] > 0


def test_stochastic_rounding_keeps_an_ema_moving_where_nearest_rounding_freezes_it() -> None:
    """AdamW's second moment with beta2 = 0.999 under a constant gradient: the exact EMA reaches
    1 - 0.999^3000 = 0.950; rounded to nearest bf16 each step it stops near 0.25 (each step's
    increment is under half a bf16 spacing there), stochastically rounded it stays unbiased."""
    from uniperceiver.bench.train_step import to_bf16_stochastic

    torch.manual_seed(0)
    sr = torch.zeros(4096, dtype=torch.bfloat16)
    rne = torch.zeros(4096, dtype=torch.bfloat16)
    for _ in range(3000):
        sr = to_bf16_stochastic(sr.float() * 0.999 + 0.001)
        rne = (rne.float() * 0.999 + 0.001).to(torch.bfloat16)
    exact = 1 - 0.999**3000
    assert abs(sr.float().mean().item() - exact) < 0.01
    assert rne.float().max().item() < 0.5
    x = torch.full((100_000,), -(1 + 2**-10))  # a quarter of a bf16 spacing above -1 in magnitude
    assert to_bf16_stochastic(x).float().mean().item() == pytest.approx(x[0].item(), abs=2e-4)


def _train_regression(make_opt, fp32_moments: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.optim.Optimizer]:
    """200 AdamW steps of a noisy least-squares fit; (start, final weights, optimizer)."""
    torch.manual_seed(0)
    target = torch.randn(16, 8)
    inputs = torch.randn(200, 64, 16)
    start = torch.randn(8, 16) * 0.1
    w = torch.nn.Parameter(start.clone())
    opt = make_opt([w])
    if fp32_moments:
        opt.init_state()
        opt.state[w]["exp_avg"] = torch.zeros_like(w)
        opt.state[w]["exp_avg_sq"] = torch.zeros_like(w)
    for x in inputs:
        (x @ w.t() - x @ target).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return start, w.detach(), opt


def test_bf16_state_adamw_is_torch_adamw_math_and_stays_close_in_bf16(monkeypatch) -> None:
    from uniperceiver.bench import train_step
    from uniperceiver.bench.train_step import AdamWBf16State

    start, ref, _ = _train_regression(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01))
    assert (ref - start).abs().max() > 0.5  # the weights moved a long way
    _, ours, opt = _train_regression(lambda ps: AdamWBf16State(ps, lr=1e-2, weight_decay=0.01))
    # bf16 moments: each step's update is off by the moments' rounding (~0.4%), a random walk.
    assert (ours - ref).abs().max() < 2e-2
    state = next(iter(opt.state.values()))
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16 and state["step"].item() == 200
    # The same update with fp32 moments and no rounding is torch's AdamW to float precision.
    monkeypatch.setattr(train_step, "to_bf16_stochastic", lambda x: x)
    _, exact, _ = _train_regression(lambda ps: AdamWBf16State(ps, lr=1e-2, weight_decay=0.01), fp32_moments=True)
    torch.testing.assert_close(exact, ref, atol=1e-5, rtol=1e-5)


def test_served_cases_warm_up_side_by_side_and_failures_become_rows() -> None:
    """--jobs: workers warm up in parallel, are timed one at a time; with keep_going a case that
    cannot run (CUDA graphs on a CPU) is an error row and the others still report; the lever table
    compares each of our cases with the compiled encoder where that ran."""
    from uniperceiver.bench.suite import BenchReport, StepOptions, parse_levers, run_training_steps

    report = BenchReport({})
    log: list[str] = []
    options = StepOptions(kinds=["text"], levers=parse_levers("eager,eager-graphs"), baselines=False, jobs=2,
                          case_timeout=300, keep_going=True)
    run_training_steps(report, torch.device("cpu"), quick=True, sizes=["tiny"], peak=lambda: 1e12, options=options,
                       log=log.append)
    sections = [(r["section"], r["name"]) for r in report.rows]
    assert sections == [("train_step", "ours tiny text"), ("error", "ours tiny text cuda-graphs"),
                        ("lever", "ours tiny text")]
    assert "cuda_graphs needs a CUDA device" in report.rows[1]["error"]
    step = report.rows[0]
    assert step["median_s"] > 0 and step["lever"] == "eager" and "host_syncs" not in step  # CPU: not measured
    assert any("warmed up" in line for line in log) and any("its last lines" in line for line in log)


def test_checkpoint_section_writes_and_resumes_every_path_and_reports_rows(tmp_path, monkeypatch) -> None:
    """The checkpoint benchmark on a tiny model, one repeat: each path saves and resumes in its own
    process, the rows carry the old vs DCP figures, and the sizes default to base and large (base
    alone with --quick)."""
    from uniperceiver.bench import checkpoint_section as cs

    results = cs.measure("tiny", repeats=1, folder=tmp_path)
    assert set(results) == {"buffered", "streamed", "dcp"}
    for method, phases in results.items():
        for phase in ("save", "resume"):
            (row,) = phases[phase]
            assert row["seconds"] > 0 and row["state_mb"] > 0, (method, phase, row)
    # the DCP checkpoint holds the same state, no bigger on disk
    assert results["dcp"]["save"][0]["bytes_on_disk"] <= 1.05 * results["buffered"]["save"][0]["bytes_on_disk"]
    assert not list(tmp_path.iterdir())  # the work folder is removed

    rows: list[tuple[str, dict]] = []

    class Report:
        def add(self, section: str, name: str, **values) -> None:
            rows.append((name, values))

    sizes: list[str] = []
    monkeypatch.setattr(cs, "measure", lambda size, repeats=3, folder=None: (sizes.append(size), results)[1])
    cs.checkpoint_section(Report(), torch.device("cpu"), quick=True)
    assert sizes == ["base"]
    assert [name for name, _ in rows] == ["base save: old (buffered) vs streamed vs dcp",
                                          "base resume: old (buffered) vs streamed vs dcp"]
    for phase, (_, values) in zip(("save", "resume"), rows):
        old, new = results["buffered"][phase][0]["seconds"], results["dcp"][phase][0]["seconds"]
        assert values["speedup"] == round(old / new, 2) and values["seconds_dcp"] == round(new, 2)
    cs.checkpoint_section(Report(), torch.device("cpu"), quick=False)
    assert sizes == ["base", "base", "large"]
