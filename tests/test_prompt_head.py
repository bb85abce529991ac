"""The classification prompt head (reference `fc_prompt`) reads the projected features BEFORE the
L2 normalisation.

Reference (modeling/predictor/embed_cls_predictor.py and meta_arch/unified_transformer.py):
`feat = postproj(h[:, 0])` = `proj(ln_post(h))`, the cosine logits normalise copies of it, and
`fc_prompt_process` computes `similarity_weight * logits + fc_prompt(feat)` on that un-normalised
`feat`. A head fed normalised features would be blind to the feature norm; these tests pin the
reference formula on real digit images and show the norm now matters.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from uniperceiver.modeling.model import UniPerceiver, VisualSegment, build_model


def _digits(n: int, size: int = 64) -> torch.Tensor:
    """Real images: sklearn's handwritten digits, upscaled and normalised."""
    from sklearn.datasets import load_digits

    imgs = torch.tensor(load_digits().images[:n], dtype=torch.float32) / 16.0
    imgs = F.interpolate(imgs[:, None], size=(size, size), mode="nearest").repeat(1, 3, 1, 1)
    return (imgs - 0.5) / 0.25


def _model(classes: int = 5) -> UniPerceiver:
    torch.manual_seed(0)
    m = build_model("tiny", cls_head_classes=classes).eval()
    with torch.no_grad():
        for b in m.encoder.blocks:  # layer scale 1e-3 makes blocks near-identity: make them count
            b.gamma_1.fill_(1.0)
            b.gamma_2.fill_(1.0)
        m.cls_head.weight.normal_(std=0.05)  # a tuned head, not the zero init
        m.cls_head.bias.normal_(std=0.1)
        m.similarity_weight.fill_(0.7)
    return m


def _reference_logits(m: UniPerceiver, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The reference formula written out from the parts: fc on ln_post -> proj, unnormalised."""
    h, _ = m.hidden([VisualSegment(images)])
    feat = m.head.proj(m.head.ln_post(h[:, 0]))
    cosine = (feat / feat.norm(dim=-1, keepdim=True)) @ targets.t()
    scale = m.head.logit_scales["img_cls"].exp().clamp(max=100.0)
    return m.similarity_weight * cosine * scale + feat @ m.cls_head.weight.t() + m.cls_head.bias


def _targets(n: int, width: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, width, generator=g), dim=-1)


def test_class_logits_are_the_reference_formula() -> None:
    m = _model()
    images, targets = _digits(4), _targets(5, m.cfg.width)
    with torch.no_grad():
        got = m.class_logits([VisualSegment(images)], targets, "img_cls")
        want = _reference_logits(m, images, targets)
    assert torch.allclose(got, want, atol=1e-5)


def test_prompt_head_sees_the_feature_norm() -> None:
    """Scaling `proj` by c leaves the cosine part unchanged and scales the head's input by c: the
    head part of the logits must follow (it would not if the head read normalised features)."""
    m = _model()
    images, targets = _digits(4), _targets(5, m.cfg.width)
    seg = [VisualSegment(images)]
    with torch.no_grad():
        raw = m.encode(seg, normalize=False)
        assert not torch.allclose(raw.norm(dim=-1), torch.ones(4), atol=1e-2)  # really un-normalised
        assert torch.allclose(F.normalize(raw, dim=-1), m.encode(seg), atol=1e-6)
        cosine = m.logits(m.encode(seg), targets, "img_cls") * m.similarity_weight
        head_before = m.class_logits(seg, targets, "img_cls") - cosine
        m.head.proj.weight.mul_(3.0)
        m.head.proj.bias.mul_(3.0)
        cosine_after = m.logits(m.encode(seg), targets, "img_cls") * m.similarity_weight
        head_after = m.class_logits(seg, targets, "img_cls") - cosine_after
        b = m.cls_head.bias
        assert torch.allclose(cosine, cosine_after, atol=1e-5)
        assert torch.allclose(head_after - b, 3.0 * (head_before - b), atol=1e-4)
        # the old behaviour (head on normalised features) gives different logits
        normalised_head = cosine_after + m.cls_head(m.encode(seg))
        assert not torch.allclose(m.class_logits(seg, targets, "img_cls"), normalised_head, atol=1e-3)


def test_prompt_head_applies_only_to_its_own_class_set() -> None:
    m = _model(classes=5)
    images = _digits(3)
    with torch.no_grad():
        other = _targets(7, m.cfg.width)
        plain = m.logits(m.encode([VisualSegment(images)]), other, "img_cls")
        assert torch.allclose(m.class_logits([VisualSegment(images)], other, "img_cls"), plain, atol=1e-6)
    assert m.has_prompt_head(5) and not m.has_prompt_head(7)
    assert not build_model("tiny").has_prompt_head(5)


def test_zero_initialised_head_leaves_the_logits_unchanged() -> None:
    torch.manual_seed(0)
    m = build_model("tiny", cls_head_classes=5).eval()
    images, targets = _digits(2), _targets(5, m.cfg.width)
    with torch.no_grad():
        plain = m.logits(m.encode([VisualSegment(images)]), targets, "img_cls")
        assert torch.allclose(m.class_logits([VisualSegment(images)], targets, "img_cls"), plain, atol=1e-6)


@pytest.mark.parametrize("scale", [None, "img_cls"])
def test_class_logits_backpropagate_into_the_head(scale: str | None) -> None:
    m = _model()
    images, targets = _digits(4), _targets(5, m.cfg.width)
    logits = m.class_logits([VisualSegment(images)], targets, scale)
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    for p in (m.cls_head.weight, m.cls_head.bias, m.similarity_weight, m.head.proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
