"""Inputs and a model shared by the decoding tests and the GPU tests."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from uniperceiver.modeling.model import build_model


def save_tiny_checkpoint(out_dir: Path) -> Path:
    """The tiny model as a model folder, seeded; LayerScale 1.0 (not the reference 1e-3) so that a
    randomly initialised model's features depend on its input and rankings differ between samples."""
    from uniperceiver.modeling.model_dir import save_model

    torch.manual_seed(0)
    return save_model(build_model("tiny", layer_scale_init=1.0), out_dir)


def digits(n: int, size: int = 64) -> torch.Tensor:
    """The first `n` scikit-learn handwritten digits (real pixels) as normalised 3-channel images."""
    from sklearn.datasets import load_digits

    imgs = torch.tensor(load_digits().images[:n], dtype=torch.float32) / 16.0
    imgs = F.interpolate(imgs[:, None], size=(size, size), mode="nearest").repeat(1, 3, 1, 1)
    return (imgs - 0.5) / 0.25


def sensitive_tiny_model() -> torch.nn.Module:
    """A seeded tiny model in eval mode whose blocks matter: LayerScale 1e-3 makes blocks near-identity,
    so the gammas are set to 1 (decoding and numerics checks would otherwise see almost nothing)."""
    torch.manual_seed(0)
    m = build_model("tiny").eval()
    with torch.no_grad():
        for b in m.encoder.blocks:
            b.gamma_1.fill_(1.0)
            b.gamma_2.fill_(1.0)
    return m
