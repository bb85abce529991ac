"""The Uni-Perceiver model: embeddings, shared encoder, similarity head, checkpoints.

Public API:
    build_model(size, **overrides) -> UniPerceiver
    model_config(size, **overrides) -> ModelConfig; ModelConfig; SIZES
    UniPerceiver.encode(segments, read=None, attn_mask=None, normalize=True, target=False) -> features
    UniPerceiver.encode_text(ids, valid) -> target features; class_logits(segments, targets, scale)
    TextSegment(ids, valid=None, positions=None), VisualSegment(pixels)
    caption_mask(context, text_len)
    save_model(model, dir), load_model(dir, **overrides)
    convert_checkpoint(source, out_dir)
"""

from __future__ import annotations

import importlib
from typing import Any

# Names load on first use (PEP 562), so `modeling.model_config` (the sizes a recipe is checked
# against) imports without torch and `upctl validate` / `upctl tasks` start fast.
_LAZY = {
    "load_model": "model_dir", "save_model": "model_dir",
    "SIZES": "model_config", "ModelConfig": "model_config", "model_config": "model_config",
    "KVCache": "encoder", "caption_mask": "masks",
    "Segment": "model", "TextSegment": "model", "UniPerceiver": "model", "VisualSegment": "model", "build_model": "model",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)

__all__ = [
    "SIZES",
    "KVCache",
    "ModelConfig",
    "Segment",
    "TextSegment",
    "UniPerceiver",
    "VisualSegment",
    "build_model",
    "caption_mask",
    "load_model",
    "model_config",
    "save_model",
]
