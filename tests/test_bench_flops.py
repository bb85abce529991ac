"""The analytic FLOP counts used for MFU agree with torch's own FLOP counter on known shapes."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from uniperceiver.bench.flops import forward_flops, train_step_flops
from uniperceiver.modeling.model import TextSegment, VisualSegment, build_model


def _counted(fn, cfg=None, batch: int = 0, seq: int = 0, backward: bool = False) -> int:
    """Torch's count; on CPU it does not see inside SDPA, so the attention matmuls of the same
    shapes (q k^T and a v, per layer) are counted separately by running them explicitly."""
    with FlopCounterMode(display=False) as counter:
        fn()
    total = counter.get_total_flops()
    ops = {str(k) for k in counter.get_flop_counts().get("Global", {})}
    if cfg is not None and not any("attention" in op for op in ops):
        q = torch.randn(batch, cfg.heads, seq, cfg.head_dim, requires_grad=backward)
        k = torch.randn(batch, cfg.heads, seq, cfg.head_dim, requires_grad=backward)
        v = torch.randn(batch, cfg.heads, seq, cfg.head_dim, requires_grad=backward)
        with FlopCounterMode(display=False) as att:
            out = (q @ k.transpose(-1, -2)).softmax(-1) @ v
            if backward:
                out.sum().backward()
        total += att.get_total_flops() * cfg.depth
    return total


def test_text_forward_flops_match_torch_counter() -> None:
    m = build_model("tiny").eval()
    ids = torch.randint(1, 1000, (3, 20))
    measured = _counted(lambda: m.encode([TextSegment(ids)]), m.cfg, 3, 21)
    assert abs(measured - forward_flops(m.cfg, 3, text_len=20)) / measured < 0.01


def test_image_and_video_forward_flops_match_torch_counter() -> None:
    m = build_model("tiny").eval()
    img = torch.randn(2, 3, 64, 64)
    measured = _counted(lambda: m.encode([VisualSegment(img)]), m.cfg, 2, 17)
    assert abs(measured - forward_flops(m.cfg, 2, frames=1)) / measured < 0.01
    clip = torch.randn(2, 4, 3, 64, 64)
    ids = torch.randint(1, 1000, (2, 7))
    measured = _counted(lambda: m.encode([VisualSegment(clip), TextSegment(ids)]), m.cfg, 2, 1 + 64 + 7)
    assert abs(measured - forward_flops(m.cfg, 2, text_len=7, frames=4)) / measured < 0.01


def test_training_step_is_three_forwards() -> None:
    m = build_model("tiny").train()
    ids = torch.randint(1, 1000, (2, 16))
    measured = _counted(lambda: m.encode([TextSegment(ids)]).sum().backward(), m.cfg, 2, 17, backward=True)
    assert abs(measured - train_step_flops(m.cfg, 2, text_len=16)) / measured < 0.02
