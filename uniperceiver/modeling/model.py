"""The unified Uni-Perceiver model: one encoder for every modality, inputs and targets alike.

A sample is a list of segments (text, image or video) fused as `[SPE] + seg_1 + seg_2 + ...`.
The representation of a sequence is read at the SPE prefix (position 0) or at given positions,
then `ln_post -> proj -> L2-normalise`. Predictions are cosine similarities to encoded targets,
scaled by a named, learnable, clamped temperature (one per task family). Target sequences (class
names, captions, vocabulary entries, answers: `encode_text`) may use deep prompts of their own.
The classification prompt head reads the projected features BEFORE normalisation (`class_logits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uniperceiver.errors import ConfigError, UpctlError
from uniperceiver.modeling.model_config import ModelConfig
from uniperceiver.modeling.embeddings import SPE_ID, Embeddings, init_embeddings
from uniperceiver.modeling.encoder import Encoder, KVCache, init_encoder


@dataclass
class TextSegment:
    """A batch of token ids [B, L]; `valid` [B, L] is True on real tokens (padding id 0 elsewhere).

    `positions` ([L] or [B, L]) defaults to 0..L-1: positions restart in every text segment.
    """

    ids: Tensor
    valid: Tensor | None = None
    positions: Tensor | None = None

    def __len__(self) -> int:
        return self.ids.shape[1]


@dataclass
class VisualSegment:
    """Normalised pixels [B, T, 3, H, W] (an image is a 1-frame video; [B, 3, H, W] accepted)."""

    pixels: Tensor

    def num_tokens(self, patch: int) -> int:
        p = self.pixels
        t = 1 if p.dim() == 4 else p.shape[1]
        return t * (p.shape[-2] // patch) * (p.shape[-1] // patch)


Segment = Union[TextSegment, VisualSegment]


class Head(nn.Module):
    """ln_post -> proj (-> L2-normalise), and the named logit scales (temperatures)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_post = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.logit_scales = nn.ParameterDict(
            {name: nn.Parameter(torch.tensor(cfg.logit_scale_init)) for name in cfg.logit_scale_names}
        )
        self.max_scale = cfg.logit_scale_max

    def project(self, rows: Tensor) -> Tensor:
        """ln_post -> proj, not normalised: what the reference's fc prompt head reads."""
        return self.proj(self.ln_post(rows))

    def forward(self, rows: Tensor) -> Tensor:
        return F.normalize(self.project(rows), dim=-1)

    def scale(self, name: str) -> Tensor:
        if name not in self.logit_scales:
            raise ConfigError(f"unknown logit scale {name!r}; known: {', '.join(self.logit_scales)}")
        return self.logit_scales[name].exp().clamp(max=self.max_scale)


class UniPerceiver(nn.Module):
    """One shared encoder + similarity head for text, images and video."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.head = Head(cfg)
        if cfg.cls_head_classes:
            self.cls_head = nn.Linear(cfg.width, cfg.cls_head_classes)
            self.similarity_weight = nn.Parameter(torch.ones(()))
        else:
            self.cls_head = None
            self.similarity_weight = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_embeddings(self.embed)
        init_encoder(self.encoder, self.cfg.layer_scale_init)
        nn.init.ones_(self.head.ln_post.weight)
        nn.init.zeros_(self.head.ln_post.bias)
        nn.init.xavier_uniform_(self.head.proj.weight)
        nn.init.zeros_(self.head.proj.bias)
        if self.cls_head is not None:
            nn.init.zeros_(self.cls_head.weight)
            nn.init.zeros_(self.cls_head.bias)

    @property
    def device(self) -> torch.device:
        return self.embed.word.weight.device

    # -- building the fused sequence ---------------------------------------------------------
    def embed_segments(
        self, segments: Sequence[Segment], temporal_offset: int | None = None, spe_prefix: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Embed `[SPE] + segments` -> (tokens [B, S, D], key_valid [B, S]).

        temporal_offset None means: random in [0, max_frames - T] while training, 0 at evaluation.
        """
        if not segments:
            raise UpctlError("a sample needs at least one segment (text, image or video)")
        batch = _batch_size(segments[0])
        for seg in segments:
            if _batch_size(seg) != batch:
                raise UpctlError(f"segments disagree on the batch size: {_batch_size(seg)} != {batch}")
        parts: list[Tensor] = []
        valid: list[Tensor] = []
        dev = self.device
        text_words = self._text_words(segments, batch, spe_prefix)
        if spe_prefix:
            parts.append(self.embed.spe_prefix(batch, text_words.pop(0) if text_words else None))
            valid.append(torch.ones(batch, 1, dtype=torch.bool, device=dev))
        for seg in segments:
            if isinstance(seg, TextSegment):
                ids = seg.ids.to(dev)
                positions = None if seg.positions is None else seg.positions.to(dev)
                parts.append(self.embed.text(ids, positions, words=text_words.pop(0)))
                v = torch.ones_like(ids, dtype=torch.bool) if seg.valid is None else seg.valid.to(dev).bool()
                valid.append(v)
            elif isinstance(seg, VisualSegment):
                pixels = seg.pixels.to(dev)
                frames = 1 if pixels.dim() == 4 else pixels.shape[1]
                offset = temporal_offset
                if offset is None:
                    spare = self.cfg.max_frames - frames
                    offset = int(torch.randint(0, spare + 1, ()).item()) if (self.training and spare > 0) else 0
                tokens = self.embed.visual(pixels, offset)
                parts.append(tokens)
                valid.append(torch.ones(batch, tokens.shape[1], dtype=torch.bool, device=dev))
            else:
                raise UpctlError(f"unknown segment type {type(seg).__name__}; use TextSegment or VisualSegment")
        return torch.cat(parts, dim=1), torch.cat(valid, dim=1)

    def _text_words(self, segments: Sequence[Segment], batch: int, spe_prefix: bool) -> list[Tensor]:
        """Word rows of the SPE prefix (if any) and of every text segment, from one table lookup.

        One lookup means one dense gradient for the 49,411-row table in backward instead of one per
        segment (each is a 150 MB zero-fill at base). Empty when there is no text segment.
        """
        ids = [seg.ids.to(self.device) for seg in segments if isinstance(seg, TextSegment)]
        if not ids:
            return []
        if spe_prefix:
            ids.insert(0, torch.full((batch, 1), SPE_ID, dtype=ids[0].dtype, device=self.device))
        for t in ids:
            if t.dim() != 2:
                raise UpctlError(f"text ids must be [batch, length], got shape {tuple(t.shape)}")
        rows = self.embed.words(torch.cat(ids, dim=1))
        return list(rows.split([t.shape[1] for t in ids], dim=1))

    # -- encoding ------------------------------------------------------------------------------
    def hidden(
        self,
        segments: Sequence[Segment],
        attn_mask: Tensor | None = None,
        temporal_offset: int | None = None,
        target: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Final-layer hidden states of `[SPE] + segments`: ([B, S, D], key_valid [B, S]).

        target: the sequence is a target (reference data_type "target"): it attends to the target
        deep prompts when the model has them (`ModelConfig.target_prompts`), else to the shared ones.
        """
        x, valid = self.embed_segments(segments, temporal_offset)
        padded = any(isinstance(seg, TextSegment) and seg.valid is not None for seg in segments)
        x, _ = self.encoder(x, valid, attn_mask, padded=padded, target=target)
        return x, valid

    def encode(
        self,
        segments: Sequence[Segment],
        read: Tensor | None = None,
        attn_mask: Tensor | None = None,
        temporal_offset: int | None = None,
        normalize: bool = True,
        target: bool = False,
    ) -> Tensor:
        """L2-normalised features. read None -> the SPE prefix [B, D]; read [B, K] -> [B, K, D]
        (positions in the fused sequence, prefix included); read [B] -> [B, D].

        normalize=False returns `ln_post -> proj` without the L2 normalisation (the features the
        classification prompt head reads). target: see `hidden`.
        """
        h, _ = self.hidden(segments, attn_mask, temporal_offset, target=target)
        return self.read_out(h, read, normalize=normalize)

    def read_out(self, hidden: Tensor, read: Tensor | None = None, normalize: bool = True) -> Tensor:
        """Apply the head at the read positions of final hidden states (normalize=False: no L2 norm)."""
        if read is None:
            rows = hidden[:, 0]
        else:
            read = read.to(hidden.device)
            if read.dim() == 1:
                rows = hidden[torch.arange(hidden.shape[0], device=hidden.device), read]
            else:
                rows = torch.gather(hidden, 1, read.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return self.head(rows) if normalize else self.head.project(rows)

    def encode_text(self, ids: Tensor, valid: Tensor | None = None) -> Tensor:
        """Encode target texts ([SPE] + ids) read at the prefix: [N, D]. Class names, answers, vocab,
        retrieval captions: every caller encodes targets, so they get the target deep prompts."""
        return self.encode([TextSegment(ids, valid)], target=True)

    # -- scoring -------------------------------------------------------------------------------
    def logit_scale(self, name: str) -> Tensor:
        return self.head.scale(name)

    def logits(self, feats: Tensor, target_feats: Tensor, scale: str | None) -> Tensor:
        """Cosine similarity [..., N_targets], times exp(logit_scale[scale]) clamped at 100.

        With a classification prompt head (prompt tuning) the reference adds fc(features) to
        similarity_weight x logits on the UN-normalised features: see `class_logits`.
        """
        sims = feats @ target_feats.t()
        return sims if scale is None else sims * self.logit_scale(scale)

    def prompt_logits(self, logits: Tensor, projected: Tensor) -> Tensor:
        """Reference fc-prompt: similarity_weight * logits + cls_head(projected), where `projected`
        is `ln_post -> proj` BEFORE the L2 normalisation (`encode(..., normalize=False)`), as the
        reference applies `fc_prompt` to the predictor's `feats`."""
        if self.cls_head is None:
            return logits
        return self.similarity_weight * logits + self.cls_head(projected)

    def has_prompt_head(self, num_targets: int) -> bool:
        """Whether the classification prompt head scores this many targets (it belongs to the class
        set it was tuned on; another target set is scored by cosine alone)."""
        return self.cls_head is not None and self.cls_head.out_features == num_targets

    def class_logits(
        self,
        segments: Sequence[Segment],
        target_feats: Tensor,
        scale: str | None,
        temporal_offset: int | None = None,
    ) -> Tensor:
        """Classification logits [B, N] of `[SPE] + segments` read at the prefix against encoded
        targets [N, D]: cosine x temperature, plus the prompt head on the un-normalised features
        when it fits the targets (reference `fc_prompt_process`)."""
        projected = self.encode(segments, temporal_offset=temporal_offset, normalize=False)
        logits = self.logits(F.normalize(projected, dim=-1), target_feats.to(projected.device), scale)
        if self.has_prompt_head(logits.shape[-1]):
            logits = self.prompt_logits(logits, projected)
        return logits

    # -- incremental decoding ------------------------------------------------------------------
    def prefill(self, segments: Sequence[Segment]) -> KVCache:
        """Encode `[SPE] + segments` once and keep every layer's keys and values."""
        x, valid = self.embed_segments(segments, temporal_offset=0)
        _, cache = self.encoder(x, valid, build_cache=True)
        assert cache is not None
        return cache

    def extend(
        self,
        cache: KVCache,
        ids: Tensor,
        positions: Tensor,
        attn_mask: Tensor | None = None,
        append: int = 0,
    ) -> tuple[Tensor, KVCache | None]:
        """Run new text tokens ([B, n] ids at text positions [B, n] or [n]) against the cache.

        attn_mask: [B|1, n, cache + n] bool (default: each new token sees the cache and itself only).
        The first `append` tokens are added to the returned cache. Returns (hidden [B, n, D], cache).
        """
        x = self.embed.text(ids.to(self.device), positions.to(self.device))
        n = ids.shape[1]
        if attn_mask is None:
            eye = torch.eye(n, dtype=torch.bool, device=self.device)
            attn_mask = torch.cat(
                [torch.ones(n, cache.length, dtype=torch.bool, device=self.device), eye], dim=1
            ).unsqueeze(0)
        valid = torch.ones(ids.shape, dtype=torch.bool, device=self.device)
        h, new_cache = self.encoder(x, valid, attn_mask, cache=cache, append_to_cache=append)
        return h, new_cache


def _batch_size(seg: Segment) -> int:
    if isinstance(seg, TextSegment):
        return seg.ids.shape[0]
    if isinstance(seg, VisualSegment):
        return seg.pixels.shape[0]
    raise UpctlError(f"unknown segment type {type(seg).__name__}; use TextSegment or VisualSegment")


def build_model(size: str = "tiny", **overrides) -> UniPerceiver:
    """`build_model("base")`: a randomly initialised model of a named size (reference init)."""
    from uniperceiver.modeling.model_config import model_config

    return UniPerceiver(model_config(size, **overrides))
