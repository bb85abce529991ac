"""Analytic FLOP counts of the encoder, so throughput can be turned into achieved FLOP/s and MFU.

A multiply-add counts as 2 FLOPs. Per token and layer the forward pass costs
2 * (4 D^2 + 2 D F) for the projections and the MLP, plus 4 * S_k * D for the attention scores and
the weighted sum over S_k keys. A training step (forward + backward) is 3x the forward pass.
"""

from __future__ import annotations

from uniperceiver.modeling.model_config import ModelConfig


def encoder_forward_flops(cfg: ModelConfig, batch: int, seq: int, keys: int | None = None) -> int:
    """Forward FLOPs of the encoder blocks for `batch` sequences of `seq` tokens attending to `keys` keys."""
    d, f = cfg.width, cfg.mlp_dim
    keys = seq if keys is None else keys
    per_token = 2 * (4 * d * d + 2 * d * f) + 4 * keys * d
    return batch * seq * per_token * cfg.depth


def patch_embed_flops(cfg: ModelConfig, images: int) -> int:
    """Forward FLOPs of the 16x16 patch convolution for `images` frames at the model's image size."""
    tokens = cfg.grid_size**2
    return 2 * images * tokens * 3 * cfg.patch_size**2 * cfg.width


def head_flops(cfg: ModelConfig, rows: int) -> int:
    """ln_post is negligible; proj is a D x D matmul per read-out row."""
    return 2 * rows * cfg.width * cfg.width


def forward_flops(cfg: ModelConfig, batch: int, text_len: int = 0, frames: int = 0, read_rows: int | None = None) -> int:
    """Forward FLOPs of `[SPE] + frames x image + text_len text tokens`, read at `read_rows` rows (default 1 per sample)."""
    seq = 1 + text_len + frames * cfg.grid_size**2
    total = encoder_forward_flops(cfg, batch, seq)
    total += patch_embed_flops(cfg, batch * frames)
    total += head_flops(cfg, batch if read_rows is None else read_rows)
    return total


def train_step_flops(cfg: ModelConfig, batch: int, text_len: int = 0, frames: int = 0) -> int:
    """Forward + backward (2x forward) for one batch."""
    return 3 * forward_flops(cfg, batch, text_len, frames)
