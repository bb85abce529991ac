"""Which parameters train: everything (pre-training, fine-tuning) or the prompt-tuning set.

Prompt tuning (reference, paper section 4.3): every LayerNorm (those of the embeddings, of every
block and `head.ln_post`), the deep prompt tokens of every layer, the learnable SPE bias, and for
classification with a prompt head the zero-initialised `cls_head` plus `similarity_weight`.
Everything else, logit scales included, stays frozen, so a tuned model differs from its source
checkpoint only in those tensors.

Deep prompts are shared by inputs and targets unless `tune.share_deep_prompt` is false: then
target sequences (retrieval captions, class names, vocabulary) get a second set of their own in
every layer (`<block>.target.prompt`), as the reference's retrieval prompt-tuning configs do
(SHARE_DEEP_PROMPT False for COCO, Flickr30k and MSVD retrieval; True everywhere else).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from uniperceiver.config.schema import TuneSection
from uniperceiver.errors import ConfigError
from uniperceiver.modeling.model_dir import load_model, read_config
from uniperceiver.modeling.model import UniPerceiver

MODES = ("full", "prompt")

_PROMPT_TRAINABLE = (
    re.compile(r"(^|\.)prompt$"),
    re.compile(r"^embed\.spe_bias$"),
    re.compile(r"^cls_head\.(weight|bias)$"),
    re.compile(r"^similarity_weight$"),
)


@dataclass
class TuningInfo:
    """How many parameters train, and which (names are the bare model's)."""

    mode: str
    trainable: int
    total: int
    names: list[str] = field(default_factory=list)

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def describe(self) -> str:
        return f"{self.trainable:,} trainable parameters of {self.total:,} ({100 * self.share:.2f}%)"


def layer_norm_params(model: nn.Module) -> set[str]:
    """Names of every nn.LayerNorm parameter (embed.norm, blocks' norm1/norm2, head.ln_post)."""
    names = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.LayerNorm):
            for p_name, _ in mod.named_parameters(recurse=False):
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def is_prompt_trainable(name: str, norms: set[str]) -> bool:
    return name in norms or any(p.search(name) for p in _PROMPT_TRAINABLE)


def setup_tuning(model: nn.Module, mode: str) -> TuningInfo:
    """Set requires_grad for `mode` ("full": all; "prompt": the prompt-tuning set) and report counts."""
    if mode not in MODES:
        raise ConfigError(f"tune.mode={mode!r}; expected one of {', '.join(MODES)}")
    norms = layer_norm_params(model)
    names = []
    trainable = total = 0
    for name, p in model.named_parameters():
        on = True if mode == "full" else is_prompt_trainable(name, norms)
        p.requires_grad_(on)
        total += p.numel()
        if on:
            trainable += p.numel()
            names.append(name)
    if mode == "prompt" and not any(n.endswith(".prompt") for n in names):
        raise ConfigError(
            "tune.mode=prompt needs deep prompt tokens: build the model with prompt_tokens > 0 "
            "(tune.prompt_tokens)"
        )
    return TuningInfo(mode, trainable, total, names)


def tuning_overrides(tune: TuneSection, model_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Model-config overrides a tuning mode needs: prompt mode adds prompts + SPE bias (reference),
    and target prompts of their own when `tune.share_deep_prompt` is false."""
    out = dict(model_overrides or {})
    if tune.mode == "prompt":
        out.setdefault("prompt_tokens", tune.prompt_tokens)
        out.setdefault("spe_bias", True)
        separate = not tune.share_deep_prompt
        given = out.setdefault("target_prompts", separate)
        if given != separate:
            raise ConfigError(f"model.overrides.target_prompts={given} contradicts tune.share_deep_prompt="
                              f"{tune.share_deep_prompt}; set only tune.share_deep_prompt")
    return out


def load_for_tuning(
    checkpoint: str | Path, tune: TuneSection, model_overrides: dict[str, Any] | None = None
) -> UniPerceiver:
    """`load_model(dir, prompt_tokens=10, spe_bias=True, [target_prompts=True], [cls_head_classes=N])`
    for prompt tuning, or the plain model for fine-tuning; new tuning tensors keep their fresh
    initialisation."""
    read_config(checkpoint)  # a clear error when the folder is not a model directory
    return load_model(checkpoint, **tuning_overrides(tune, model_overrides))


__all__ = ["MODES", "TuningInfo", "is_prompt_trainable", "layer_norm_params", "load_for_tuning", "setup_tuning", "tuning_overrides"]
