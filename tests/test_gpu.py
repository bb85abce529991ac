"""The GPU paths: bf16 autocast, SDPA's flash kernel, torch.compile, pinned-memory loading, the trainer
and cached decoding on a CUDA device.

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
