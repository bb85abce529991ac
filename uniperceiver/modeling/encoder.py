"""The shared Transformer encoder: pre-norm blocks, fused q/k/v, SDPA, LayerScale, DropPath.

Extras the tasks need:
- arbitrary boolean attention masks ([B, Sq, Sk], True = may attend), e.g. the captioning mask;
- a key/value cache per layer for incremental caption decoding (keys and values of the cached
  tokens are computed once; new tokens attend to cache + themselves);
- deep prompts: learnable tokens per layer, passed through that layer's LN1 and prepended to the
  keys and values only (prefix tuning, as in the reference); with `target_prompts`, target
  sequences (class names, captions, vocabulary) use a second set of their own (reference
  SHARE_DEEP_PROMPT False).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from uniperceiver.modeling.model_config import ModelConfig


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample with probability p (training only)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


@dataclass
class KVCache:
    """Per-layer keys and values ([B, heads, S, head_dim]) and which cached keys are real ([B, S])."""

    keys: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)
    valid: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.valid is None else self.valid.shape[1]

    def reorder(self, index: Tensor) -> "KVCache":
        """Select / repeat batch rows (beam search): a new cache whose row i is old row index[i]."""
        return KVCache(
            keys=[k.index_select(0, index) for k in self.keys],
            values=[v.index_select(0, index) for v in self.values],
            valid=None if self.valid is None else self.valid.index_select(0, index),
        )


class Attention(nn.Module):
    """Multi-head self-attention with a packed q/k/v projection (q, k, v order, with biases)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.out = nn.Linear(cfg.width, cfg.width)

    def _split(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.head_dim).transpose(1, 2)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values only ([B, H, S, hd]) for already-normalised tokens."""
        d = self.heads * self.head_dim
        kv = F.linear(x, self.qkv.weight[d:], self.qkv.bias[d:])
        k, v = kv.split(d, dim=-1)
        return self._split(k), self._split(v)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        prefix_kv: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x: [B, S, D] normalised. mask: bool [B, 1 or S, Sk_total] (True = attend) or None.

        Returns the projected attention output and the keys and values attended to (see `attend`).
        """
        merged, keys, vals = self.attend(x, mask, prefix_kv)
        return self.out(merged), keys, vals

    def attend(
        self,
        x: Tensor,
        mask: Tensor | None,
        prefix_kv: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Attention before the output projection: heads merged ([B, S, D]), keys and values attended
        to: `prefix_kv` followed by this call's own. A cache keeps slices of these (views), so the
        prefix is copied once per call."""
        q, k, v = self._split_qkv(x)
        keys, vals = k, v
        if prefix_kv is not None:
            keys = torch.cat([prefix_kv[0], k], dim=2)
            vals = torch.cat([prefix_kv[1], v], dim=2)
        attn_mask = None if mask is None else mask.unsqueeze(1)  # [B, 1, Sq|1, Sk]
        out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=attn_mask)
        b, h, s, hd = out.shape
        return out.transpose(1, 2).reshape(b, s, h * hd), keys, vals

    def _split_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self._split(q), self._split(k), self._split(v)


class TargetPrompt(nn.Module):
    """The deep prompt tokens of target sequences in one layer, `prompt` [P, D].

    A module of its own so that the parameter is named `<block>.target.prompt`: every rule that
    recognises deep prompts by the `.prompt` suffix (prompt-tuning set, no weight decay, tuning
    extras a pre-trained checkpoint lacks) covers it too.
    """

    def __init__(self, tokens: int, width: int) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.zeros(tokens, width))


class Block(nn.Module):
    """Pre-LN block: x + g1 * MHA(LN1(x)); x + g2 * W2 GELU(W1 LN2(x)) (exact erf GELU)."""

    def __init__(self, cfg: ModelConfig, drop_path: float) -> None:
        super().__init__()
        d = cfg.width
        self.norm1 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.fc1 = nn.Linear(d, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, d)
        self.gamma_1 = nn.Parameter(torch.full((d,), cfg.layer_scale_init))
        self.gamma_2 = nn.Parameter(torch.full((d,), cfg.layer_scale_init))
        self.drop_path = DropPath(drop_path)
        self.prompt = nn.Parameter(torch.zeros(cfg.prompt_tokens, d)) if cfg.prompt_tokens > 0 else None
        self.target = TargetPrompt(cfg.prompt_tokens, d) if cfg.target_prompts and cfg.prompt_tokens > 0 else None

    def prompt_for(self, target: bool) -> Tensor | None:
        """The deep prompt tokens a sequence attends to: the targets' own set when there is one."""
        if target and self.target is not None:
            return self.target.prompt
        return self.prompt

    def forward(
        self, x: Tensor, mask: Tensor | None, past: tuple[Tensor, Tensor] | None = None, target: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (output, keys, values): keys/values as attended, [prompts] + [past] + this call's own.

        target: x is a target sequence (uses the target prompts when the model has them).
        """
        h = self.norm1(x)
        prefix = past
        prompt = self.prompt_for(target)
        if prompt is not None:
            pk, pv = self.attn.project_kv(self.norm1(prompt).unsqueeze(0))
            pk, pv = pk.expand(x.shape[0], -1, -1, -1), pv.expand(x.shape[0], -1, -1, -1)
            prefix = (pk, pv) if past is None else (torch.cat([pk, past[0]], 2), torch.cat([pv, past[1]], 2))
        merged, k, v = self.attn.attend(h, mask, prefix)
        x = self._residual(x, merged, self.attn.out, self.gamma_1)
        x = self._residual(x, F.gelu(self.fc1(self.norm2(x))), self.fc2, self.gamma_2)
        return x, k, v

    def _residual(self, x: Tensor, inp: Tensor, linear: nn.Linear, gamma: Tensor) -> Tensor:
        """x + DropPath(gamma * linear(inp)), with LayerScale applied where it costs least.

        Scaling the activations keeps `linear(inp)` alive for gamma's gradient and costs two
        activation-sized passes in backward; folding gamma into the weight and bias (same function
        and gradients up to rounding) costs three weight-sized passes instead. Fold when the
        activations are the larger (big batches: a GPU step), else one fused multiply-add.
        """
        plain = self.drop_path.p == 0.0 or not self.training
        if 2 * (inp.numel() // inp.shape[-1]) >= 3 * linear.in_features:
            branch = F.linear(inp, linear.weight * gamma[:, None], linear.bias * gamma)
        elif plain:
            return torch.addcmul(x, gamma, linear(inp))
        else:
            branch = gamma * linear(inp)
        return x + branch if plain else x + self.drop_path(branch)


class Encoder(nn.Module):
    """A stack of blocks; the same DropPath rate in every layer (reference)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(Block(cfg, cfg.drop_path) for _ in range(cfg.depth))
        self.grad_checkpointing = cfg.grad_checkpointing

    def _full_mask(self, key_valid: Tensor, attn_mask: Tensor | None, past_len: int) -> Tensor:
        """Combine key padding ([B, Sk]) with an optional [B|1, Sq, Sk] mask; prepend prompt columns."""
        mask = key_valid[:, None, :]  # [B, 1, Sk]
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                attn_mask = attn_mask.unsqueeze(0)
            mask = mask & attn_mask
        p = self.cfg.prompt_tokens
        if p:
            ones = torch.ones(mask.shape[0], mask.shape[1], p, dtype=torch.bool, device=mask.device)
            mask = torch.cat([ones, mask], dim=-1)
        return mask

    @staticmethod
    def _all_valid(valid: Tensor, maybe_padded: bool) -> bool:
        """Whether no key is padding. Looking reads the tensor (a GPU->host sync, a graph break under
        torch.compile), so it is skipped when the caller vouches there is no padding, and while
        compiling (the mask then stays: same result, another attention kernel)."""
        if not maybe_padded:
            return True
        if torch.compiler.is_compiling():
            return False
        return bool(valid.all())

    def forward(
        self,
        x: Tensor,
        key_valid: Tensor,
        attn_mask: Tensor | None = None,
        cache: KVCache | None = None,
        append_to_cache: int = 0,
        build_cache: bool = False,
        padded: bool = True,
        target: bool = False,
    ) -> tuple[Tensor, KVCache | None]:
        """Run every block.

        x: [B, S, D] embedded tokens; key_valid: [B, S] bool for these tokens.
        attn_mask: bool [B|1, S, S_cache + S] (True = attend) or None for fully bidirectional.
        cache: keys/values of earlier tokens that x may attend to (not modified in place).
        append_to_cache: how many leading tokens of x to add to the returned cache.
        build_cache: return a fresh cache holding all of x (prefill).
        padded: False when the caller knows every key is valid (no padded text): saves a host sync.
        target: x is a target sequence (its own deep prompts when the model has `target_prompts`).
        """
        past_len = 0 if cache is None else cache.length
        all_valid = key_valid if cache is None else torch.cat([cache.valid, key_valid], dim=1)
        mask = self._full_mask(all_valid, attn_mask, past_len)
        if attn_mask is None and self.cfg.prompt_tokens == 0 and self._all_valid(all_valid, padded or cache is not None):
            mask = None  # no masking at all: lets SDPA pick its fastest kernel (flash on GPUs)
        new_cache = KVCache() if (build_cache or append_to_cache) else None
        for i, block in enumerate(self.blocks):
            past = None if cache is None else (cache.keys[i], cache.values[i])
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x, k, v = checkpoint(block, x, mask, past, target, use_reentrant=False)
            else:
                x, k, v = block(x, mask, past, target)
            if new_cache is not None:
                n = x.shape[1] if build_cache else append_to_cache
                # k, v are [prompts] + [cache] + this call's tokens: keep the cache and the first n
                # new tokens as a view (no second copy of the cache per layer and step).
                skip = self.cfg.prompt_tokens
                new_cache.keys.append(k[:, :, skip:skip + past_len + n])
                new_cache.values.append(v[:, :, skip:skip + past_len + n])
        if new_cache is not None:
            n = key_valid.shape[1] if build_cache else append_to_cache
            new_cache.valid = key_valid[:, :n] if cache is None else torch.cat([cache.valid, key_valid[:, :n]], dim=1)
        return x, new_cache


def init_encoder(enc: Encoder, layer_scale_init: float) -> None:
    """Reference init: xavier-uniform with q, k, v as separate matrices; zero biases; LN 1/0."""
    for block in enc.blocks:
        w = block.attn.qkv.weight
        d = w.shape[1]
        for part in w.data.split(d, dim=0):
            nn.init.xavier_uniform_(part)
        nn.init.zeros_(block.attn.qkv.bias)
        for lin in (block.attn.out, block.fc1, block.fc2):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        for norm in (block.norm1, block.norm2):
            nn.init.ones_(norm.weight)
            nn.init.zeros_(norm.bias)
        nn.init.constant_(block.gamma_1, layer_scale_init)
        nn.init.constant_(block.gamma_2, layer_scale_init)
        if block.prompt is not None:
            nn.init.normal_(block.prompt, std=0.02)
        if block.target is not None:
            nn.init.normal_(block.target.prompt, std=0.02)
