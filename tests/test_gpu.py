"""The GPU paths: bf16 autocast, SDPA's flash kernel, torch.compile, pinned-memory loading, the trainer
and cached decoding on a CUDA device; and the levers the benchmark times (the whole step compiled, the
step replayed from a CUDA graph, bf16 optimizer state, the chunked contrastive loss, no host syncs),
each checked to compute what the plain step computes, so that their timings compare like with like.

Skipped where there is no CUDA device (CI has none); `benchmarks/gpu_check.sh` runs this file on a lent
GPU before it times anything. The mini data needs scikit-learn and scikit-image only (no gensim there).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uniperceiver.config import recipe_from_dict
from uniperceiver.engine import train_checkpoint as ckpt
from uniperceiver.engine.trainer import train
from uniperceiver.modeling.model import TextSegment, VisualSegment

import sys as _sys
_sys.path.insert(0, str(Path(__file__).parent))
from _tiny_models import digits as _digits, sensitive_tiny_model  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def gpu_mini_data(tmp_path_factory) -> Path:
    from uniperceiver.data.format import prepare_dataset

    root = tmp_path_factory.mktemp("gpu-mini")
    prepare_dataset("mini", None, root, options={"only": "digits,photos,faces"})
    return root


def test_cuda_fp32_matches_cpu_and_bf16_stays_close() -> None:
    model = sensitive_tiny_model()
    ids = torch.randint(1, 49000, (4, 12), generator=torch.Generator().manual_seed(0))
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, 7:] = False  # one padded caption: the masked attention path
    images = _digits(4)
    with torch.no_grad():
        cpu_img = model.encode([VisualSegment(images)], temporal_offset=0)
        cpu_txt = model.encode([TextSegment(ids, valid)])
        gpu = model.cuda()
        gpu_img = gpu.encode([VisualSegment(images.cuda())], temporal_offset=0)
        gpu_txt = gpu.encode([TextSegment(ids.cuda(), valid.cuda())])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf_img = gpu.encode([VisualSegment(images.cuda())], temporal_offset=0)
            bf_txt = gpu.encode([TextSegment(ids.cuda(), valid.cuda())])
    torch.testing.assert_close(gpu_img.cpu(), cpu_img, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(gpu_txt.cpu(), cpu_txt, atol=2e-3, rtol=2e-3)
    # Features are L2-normalised: bf16 must keep each within a small angle of the fp32 one.
    assert F.cosine_similarity(bf_img.float(), gpu_img, dim=-1).min() > 0.99
    assert F.cosine_similarity(bf_txt.float(), gpu_txt, dim=-1).min() > 0.99


def test_unpadded_batches_run_on_the_flash_kernel() -> None:
    """No padding and no attention mask -> no mask tensor at all, so SDPA may take flash attention:
    with every other kernel disabled the forward and backward still run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = sensitive_tiny_model().cuda().train()
    ids = torch.randint(1, 49000, (4, 16), device="cuda")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.autocast("cuda", dtype=torch.bfloat16):
        h, _ = model.hidden([VisualSegment(_digits(4).cuda()), TextSegment(ids)], temporal_offset=0)
        h.float().pow(2).mean().backward()
    assert torch.isfinite(model.encoder.blocks[0].attn.qkv.weight.grad).all()


def test_compiled_encoder_equals_eager() -> None:
    model = sensitive_tiny_model().cuda()
    images = _digits(4).cuda()
    with torch.no_grad():
        eager = model.encode([VisualSegment(images)], temporal_offset=0)
        model.encoder.compile()
        compiled = model.encode([VisualSegment(images)], temporal_offset=0)
    torch.testing.assert_close(compiled, eager, atol=2e-3, rtol=2e-3)


def test_cached_decoding_equals_recomputation_on_cuda() -> None:
    from uniperceiver.modeling.decoding import beam_search, decode_uncached
    from uniperceiver.tasks.base import encode_targets, vocab_target_set
    from uniperceiver.tokenizers.text import EOT_ID

    model = sensitive_tiny_model().cuda()
    rng = np.random.default_rng(0)
    words = sorted({int(i) for i in rng.choice(49406, size=150, replace=False)} | {EOT_ID})
    ts = vocab_target_set(words)
    with torch.no_grad():
        feats = encode_targets(model, ts)
    ids = ts.ids[:, 0].clone()
    segs = [VisualSegment(_digits(4).cuda())]
    cached = beam_search(model, segs, feats, ids, beam_size=2, max_len=7)
    full = decode_uncached(model, segs, feats, ids, beam_size=2, max_len=7)
    assert cached == full and len({tuple(c) for c in cached}) > 1


def _recipe(tasks: list[dict], **train_opts) -> object:
    return recipe_from_dict({
        "name": "gpu",
        "model": {"size": "tiny", "overrides": {"depth": 2}},
        "optim": {"lr": 5e-3, "warmup_steps": 3, "weight_decay": 0.0, "min_lr": 1e-5, "clip_grad": 1.0},
        "train": {"max_steps": 120, "ckpt_every": 60, "log_every": 1, "seed": 0, "precision": "bf16",
                  "num_workers": 2, **train_opts},
        "tasks": tasks,
    })


def test_bf16_pretraining_on_cuda_lowers_each_loss_and_resumes(gpu_mini_data, tmp_path) -> None:
    # The CPU trainer test's tasks, twice its steps (cheap on a GPU; bf16 rounding is noisier).
    tasks = [{"name": "mini-faces", "batch_size": 16},
             {"name": "mini-photos-retrieval", "batch_size": 8},
             {"name": "mini-photos-caption", "batch_size": 8}]
    result = train(_recipe(tasks), output=tmp_path / "run", data_dir=gpu_mini_data, log=lambda m: None)
    assert result.step == 120
    by_task: dict[str, list[float]] = {}
    for _, name, loss in result.history:
        by_task.setdefault(name, []).append(loss)
    for name, losses in by_task.items():
        assert all(np.isfinite(losses)), name
        k = max(2, len(losses) // 3)
        assert np.mean(losses[-k:]) < np.mean(losses[:k]) - 0.05, (name, losses)
    latest = ckpt.find_valid_checkpoint(result.run_dir / "checkpoints")
    assert latest is not None and latest.name == "step-000120"
    more = train(_recipe(tasks, max_steps=130), output=tmp_path / "run", data_dir=gpu_mini_data,
                 log=lambda m: None, resume="auto")
    assert more.step == 130


def test_compiled_bf16_training_on_cuda(gpu_mini_data, tmp_path) -> None:
    rec = _recipe([{"name": "mini-digits", "batch_size": 32}], max_steps=12, ckpt_every=0, compile=True)
    result = train(rec, output=tmp_path / "run", data_dir=gpu_mini_data, log=lambda m: None)
    losses = [loss for _, _, loss in result.history]
    assert result.step == 12 and all(np.isfinite(losses))


# -- the benchmark's levers ------------------------------------------------------------------------

def _bench_step(kind: str = "retrieval", warmup: int = 0, **levers):
    """The benchmark's own training step for a tiny model at 224 px under bf16 autocast, seeded so
    that two builds start from the same weights."""
    from uniperceiver.bench.train_step import StepCase, prepare_step_case

    shape = {"text": dict(text_len=16), "image": dict(frames=1), "retrieval": dict(frames=1, text_len=8)}[kind]
    torch.manual_seed(0)
    case = StepCase(impl="ours", size="tiny", kind=kind, batch=8, precision="bf16", **shape, **levers)
    return prepare_step_case(case, torch.device("cuda"), warmup=warmup)


def _loss_and_grads(prep) -> tuple[float, dict[str, torch.Tensor]]:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = prep.loss_fn()
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in prep.model.named_parameters() if p.grad is not None}
    prep.model.zero_grad(set_to_none=True)
    return loss.item(), grads


def test_whole_step_compiled_equals_eager_within_bf16() -> None:
    """compile_scope="step": embeddings, encoder, head and contrastive loss in one compiled graph
    give the eager loss and gradients (bf16 rounding apart)."""
    eager_loss, eager_grads = _loss_and_grads(_bench_step())
    compiled_loss, compiled_grads = _loss_and_grads(_bench_step(compile=True, compile_scope="step"))
    assert compiled_loss == pytest.approx(eager_loss, rel=2e-2)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, g in eager_grads.items():
        if g.norm() > 1e-6:
            assert F.cosine_similarity(compiled_grads[name].flatten(), g.flatten(), dim=0) > 0.98, name


def test_chunked_contrastive_loss_compiles_and_matches_the_plain_loss_on_cuda() -> None:
    from uniperceiver.modeling.contrastive import chunked_contrastive_loss, contrastive_loss

    g = torch.Generator(device="cuda").manual_seed(0)
    img = F.normalize(torch.randn(64, 32, device="cuda", generator=g), dim=-1).requires_grad_()
    txt = F.normalize(img.detach() + torch.randn(64, 32, device="cuda", generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(14.0, device="cuda")
    compiled = torch.compile(lambda i, t: chunked_contrastive_loss(i, t, scale, 0.1, chunk_size=16).total, fullgraph=True)
    out = compiled(img, txt)
    out.backward()
    gi = img.grad.clone()
    img.grad = None
    ref = contrastive_loss(img, txt, scale, 0.1).total
    ref.backward()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(gi, img.grad, atol=1e-5, rtol=1e-3)


def test_cuda_graph_step_replays_the_eager_step() -> None:
    """The captured step (forward, backward, fused AdamW) moves every parameter as the same step run
    op by op does, from the same weights and optimizer state."""
    prep = _bench_step(cuda_graphs=True)
    replay = prep.step  # captured now, after two warm-up steps on a side stream
    params = list(prep.model.parameters())
    state = [{k: v.clone() for k, v in prep.optimizer.state[p].items()} for p in params if p in prep.optimizer.state]
    before = [p.detach().clone() for p in params]

    def restore() -> None:
        with torch.no_grad():
            for p, b in zip(params, before):
                p.copy_(b)
            for p, saved in zip([p for p in params if p in prep.optimizer.state], state):
                for k, v in saved.items():
                    prep.optimizer.state[p][k].copy_(v)

    replay()
    torch.cuda.synchronize()
    graph_moves = [p.detach() - b for p, b in zip(params, before)]
    restore()
    prep.optimizer.zero_grad(set_to_none=True)  # the graph's gradient buffers would be accumulated into
    prep.eager_step()
    torch.cuda.synchronize()
    moved = 0
    for b, g_move, p in zip(before, graph_moves, params):
        # lr is 1e-4: a missing or doubled update is off by ~1e-4; atomics in backward by far less.
        torch.testing.assert_close(g_move, p.detach() - b, atol=1e-5, rtol=0.05)
        moved += int(g_move.abs().max() > 1e-6)
    assert moved > len(params) // 2  # the replay did update the weights
    replay()  # and replays again after an eager step in between
    torch.cuda.synchronize()


@pytest.mark.parametrize("kind", ["text", "image", "retrieval"])
def test_benchmark_steps_make_no_host_syncs(kind: str) -> None:
    """Nothing in our training step (embeddings, encoder, loss, fused AdamW) reads a device tensor on
    the host, so a loop can queue step after step: a sync found here is a stall in every step."""
    from uniperceiver.bench.timing import count_host_syncs

    prep = _bench_step(kind, warmup=1)
    assert count_host_syncs(prep.step, torch.device("cuda")) == 0
    # The counter does see a sync when there is one.
    assert count_host_syncs(lambda: torch.ones(1, device="cuda").item(), torch.device("cuda")) == 1


def test_bf16_state_adamw_compiled_on_cuda_matches_its_eager_update() -> None:
    from uniperceiver.bench.train_step import AdamWBf16State

    torch.manual_seed(0)
    start = [torch.randn(257, 33, device="cuda"), torch.randn(5, device="cuda"), torch.randn((), device="cuda")]
    grads = [[torch.randn_like(p) for p in start] for _ in range(5)]
    moves = []
    for compile in (False, True):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = AdamWBf16State(params, lr=1e-2, compile=compile)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        moves.append([p.detach() - s for p, s in zip(params, start)])
        assert all(opt.state[p]["exp_avg"].dtype == torch.bfloat16 for p in params)
    for eager, compiled in zip(*moves):
        # Each run draws its own rounding noise: the updates agree to a few bf16 spacings.
        assert (compiled - eager).abs().max() <= 0.05 * eager.abs().max()

