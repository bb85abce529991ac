"""The chunked contrastive loss equals the plain one (values, accuracies and the gradients of images,
captions and the temperature) on real-shaped features: a base model's 768-wide features, one GPU's
batch of 256 pairs, the retrieval temperature."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from uniperceiver.modeling.contrastive import chunked_contrastive_loss, contrastive_loss


def _features(n: int = 256, d: int = 768, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised image and caption features whose pairs are related (so the losses are not all
    log(N)) and the CLIP temperature exp(log(1/0.07)) as a leaf that requires grad."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, d, generator=g)
    txt = img + 6.0 * torch.randn(n, d, generator=g)
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    return F.normalize(img, dim=-1).requires_grad_(), F.normalize(txt, dim=-1).requires_grad_(), log_scale


def _grads(fn, img, txt, log_scale, w_i2t: float, w_t2i: float):
    for t in (img, txt, log_scale):
        t.grad = None
    out = fn(img, txt, log_scale.exp())
    (w_i2t * out.i2t + w_t2i * out.t2i).backward()
    return out, img.grad.clone(), txt.grad.clone(), log_scale.grad.clone()


@pytest.mark.parametrize("chunk_size", [64, 100, 256, 1024])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_chunked_equals_plain_values_and_gradients(chunk_size: int, label_smoothing: float) -> None:
    img, txt, log_scale = _features()
    # Unequal weights on the two directions: each direction's gradient must be right on its own.
    weights = (0.3, 1.7)
    plain = _grads(lambda i, t, s: contrastive_loss(i, t, s, label_smoothing), img, txt, log_scale, *weights)
    chunked = _grads(lambda i, t, s: chunked_contrastive_loss(i, t, s, label_smoothing, chunk_size=chunk_size),
                     img, txt, log_scale, *weights)
    (p_out, p_gi, p_gt, p_gs), (c_out, c_gi, c_gt, c_gs) = plain, chunked
    assert 0.5 < p_out.i2t.item() < math.log(256)  # informative features: between perfect and chance
    for name in ("i2t", "t2i", "acc_i2t", "acc_t2i"):
        torch.testing.assert_close(getattr(c_out, name), getattr(p_out, name), atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(c_out.total, p_out.total, atol=1e-5, rtol=0)
    torch.testing.assert_close(c_gi, p_gi, atol=1e-5, rtol=0)
    torch.testing.assert_close(c_gt, p_gt, atol=1e-5, rtol=0)
    torch.testing.assert_close(c_gs, p_gs, atol=1e-5, rtol=0)
    assert p_gi.abs().max() > 1e-4 and p_gs.abs() > 1e-4  # the comparison is not between zeros


def test_accuracies_count_top1_in_each_direction() -> None:
    # Image 0's best caption is caption 1 (a miss for i2t); caption 0's best image is image 0 (a hit).
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    for fn in (contrastive_loss, lambda i, t, s: chunked_contrastive_loss(i, t, s, chunk_size=1)):
        out = fn(img, txt, 10.0)
        assert out.acc_i2t.item() == pytest.approx(0.0) and out.acc_t2i.item() == pytest.approx(0.0)
        out = fn(img, txt.flip(0), 10.0)
        assert out.acc_i2t.item() == pytest.approx(1.0) and out.acc_t2i.item() == pytest.approx(1.0)


def test_bf16_features_get_bf16_gradients_close_to_fp32() -> None:
    img, txt, log_scale = _features(n=64, d=128)
    ref = _grads(chunked_contrastive_loss, img, txt, log_scale, 1.0, 1.0)
    img16 = img.detach().bfloat16().requires_grad_()
    txt16 = txt.detach().bfloat16().requires_grad_()
    out = chunked_contrastive_loss(img16, txt16, log_scale.exp().detach(), chunk_size=16)
    out.total.backward()
    assert img16.grad.dtype == torch.bfloat16 and txt16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.total, ref[0].total, atol=0.05, rtol=0)  # bf16 inputs, fp32 math
    assert F.cosine_similarity(img16.grad.float().flatten(), ref[1].flatten(), dim=0) > 0.99


def test_chunks_never_hold_the_full_logits() -> None:
    """The point of chunking: no tensor of N x N entries is created in forward or backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    n, d = 256, 32
    img, txt, log_scale = _features(n=n, d=d)
    for fn, bound in ((lambda i, t, s: chunked_contrastive_loss(i, t, s, chunk_size=32), 32 * n),
                      (contrastive_loss, n * n)):
        with LargestOutput() as mode:
            fn(img, txt, log_scale.exp()).total.backward()
        assert mode.largest == max(bound, n * d), fn


def test_rejects_mismatched_or_bad_arguments() -> None:
    a = torch.randn(4, 8)
    with pytest.raises(ValueError, match="one shape"):
        chunked_contrastive_loss(a, torch.randn(5, 8), 1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        contrastive_loss(a, a, 1.0, label_smoothing=1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_contrastive_loss(a, a, 1.0, chunk_size=0)
