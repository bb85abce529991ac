"""Token embeddings: text, image/video patches and the <SPE> prefix, sharing one LayerNorm.

Reference conventions (see reference-conventions.md, "The fused sequence"):
- text token at in-segment position p: LN(E[id] + P_text[p] + Type[0]);
- visual token at frame t, patch (r, c): LN(conv + Spatial[r*W + c] + Temporal[t]) (no type row);
- the SPE prefix: LN(E[49410]) with no position and no type embedding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from uniperceiver.errors import UpctlError
from uniperceiver.modeling.model_config import ModelConfig

SPE_ID = 49410


def sincos_2d(grid_h: int, grid_w: int, dim: int, scale: float) -> Tensor:
    """Fixed 2-D sin-cos table [grid_h * grid_w, dim]: row coordinates fill the first half.

    Channels are [sin(r s w), cos(r s w), sin(c s w), cos(c s w)] with w_k = 10000^(-k / (dim/4)).
    """
    quarter = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    rows = torch.arange(grid_h, dtype=torch.float64) * scale
    cols = torch.arange(grid_w, dtype=torch.float64) * scale
    r = rows[:, None, None] * omega  # [H, 1, Q]
    c = cols[None, :, None] * omega  # [1, W, Q]
    r = r.expand(grid_h, grid_w, quarter)
    c = c.expand(grid_h, grid_w, quarter)
    table = torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=-1)
    return table.reshape(grid_h * grid_w, dim).float()


class Embeddings(nn.Module):
    """All input embeddings of the unified model (the LayerNorm is shared by text and vision)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.word = nn.Embedding(cfg.vocab_size, d)
        self.text_pos = nn.Embedding(cfg.max_text_len, d)
        self.token_type = nn.Embedding(2, d)
        self.norm = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.patch = nn.Conv2d(3, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.temporal_pos = nn.Embedding(cfg.max_frames, d)
        g = cfg.grid_size
        self.register_buffer("spatial_pos", sincos_2d(g, g, d, cfg.pos_scale), persistent=True)
        self.spe_bias = nn.Parameter(torch.zeros(1, d)) if cfg.spe_bias else None

    # -- text -------------------------------------------------------------------------------
    def words(self, ids: Tensor) -> Tensor:
        """Word-table rows (plus the SPE bias on SPE ids) for [B, L] ids, before positions and LN.

        The fused sequence looks up the SPE prefix and every text segment in one call, because each
        lookup gives the 49,411 x D table its own dense gradient (a 150 MB fill at base) in backward.
        """
        emb = self.word(ids)
        if self.spe_bias is not None:
            emb = emb + (ids == SPE_ID).unsqueeze(-1).to(emb.dtype) * self.spe_bias
        return emb

    def spe_prefix(self, batch: int, words: Tensor | None = None) -> Tensor:
        """LN(E[<|spe|>]) for every sequence: [B, 1, D]. `words`: its [B, 1, D] rows, already looked up."""
        if words is not None:
            return self.norm(words)
        ids = torch.full((1, 1), SPE_ID, dtype=torch.long, device=self.word.weight.device)
        return self.norm(self.words(ids)).expand(batch, 1, -1)

    def text(self, ids: Tensor, positions: Tensor | None = None, words: Tensor | None = None) -> Tensor:
        """[B, L] ids (positions default 0..L-1, restarting in every segment) -> [B, L, D].

        `words`: `self.words(ids)` when the caller has looked the rows up already (see `words`)."""
        if ids.dim() != 2:
            raise UpctlError(f"text ids must be [batch, length], got shape {tuple(ids.shape)}")
        length = ids.shape[1]
        if positions is None:
            if length > self.cfg.max_text_len:
                raise UpctlError(
                    f"text segment of {length} tokens exceeds the {self.cfg.max_text_len} learned positions; "
                    "truncate it (the tokenizer's encode_batch does)"
                )
            positions = torch.arange(length, device=ids.device)
        elif int(positions.max()) >= self.cfg.max_text_len:
            raise UpctlError(f"text position {int(positions.max())} >= max_text_len={self.cfg.max_text_len}")
        x = (self.words(ids) if words is None else words) + self.text_pos(positions) + self.token_type.weight[0]
        return self.norm(x)

    # -- images and video -------------------------------------------------------------------
    def visual(self, pixels: Tensor, temporal_offset: int = 0) -> Tensor:
        """[B, T, 3, H, W] (or [B, 3, H, W] for images) -> [B, T * N, D], frame-major tokens."""
        if pixels.dim() == 4:
            pixels = pixels.unsqueeze(1)
        if pixels.dim() != 5 or pixels.shape[2] != 3:
            raise UpctlError(
                f"visual input must be [batch, frames, 3, height, width] (or [batch, 3, H, W]), got {tuple(pixels.shape)}"
            )
        if not pixels.is_floating_point():
            raise UpctlError(f"visual input must be a float tensor (normalised pixels), got dtype {pixels.dtype}")
        b, t, _, h, w = pixels.shape
        p = self.cfg.patch_size
        if h % p or w % p:
            raise UpctlError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        if t + temporal_offset > self.cfg.max_frames:
            raise UpctlError(
                f"a clip of {t} frames (temporal offset {temporal_offset}) exceeds the temporal table of "
                f"{self.cfg.max_frames} frames"
            )
        x = self.patch(pixels.reshape(b * t, 3, h, w).to(self.patch.weight.dtype))  # [B*T, D, gh, gw]
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2).reshape(b, t, gh * gw, -1)
        x = x + self._spatial(gh, gw).to(x.dtype)
        frames = torch.arange(temporal_offset, temporal_offset + t, device=x.device)
        x = x + self.temporal_pos(frames)[None, :, None, :]
        return self.norm(x.reshape(b, t * gh * gw, -1))

    def _spatial(self, gh: int, gw: int) -> Tensor:
        g = self.cfg.grid_size
        if gh == g and gw == g:
            return self.spatial_pos
        # Another resolution: the same fixed sin-cos function on the new grid (same coordinate scale).
        return sincos_2d(gh, gw, self.cfg.width, self.cfg.pos_scale).to(self.spatial_pos.device)


def init_embeddings(emb: Embeddings) -> None:
    """Reference initialisation: N(0, 0.02) embeddings, LayerNorm 1/0, xavier-uniform patch conv."""
    for table in (emb.word, emb.text_pos, emb.token_type, emb.temporal_pos):
        nn.init.normal_(table.weight, std=0.02)
    nn.init.ones_(emb.norm.weight)
    nn.init.zeros_(emb.norm.bias)
    w = emb.patch.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(emb.patch.bias)
