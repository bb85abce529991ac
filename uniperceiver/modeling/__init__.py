"""The Uni-Perceiver model: embeddings, shared encoder, similarity head, checkpoints.

Public API:
    build_model(size, **overrides) -> UniPerceiver
    model_config(size, **overrides) -> ModelConfig; ModelConfig; SIZES
    UniPerceiver.encode(segments, read=None, attn_mask=None) -> L2-normalised features
    TextSegment(ids, valid=None, positions=None), VisualSegment(pixels)
    caption_mask(context, text_len)
    save_model(model, dir), load_model(dir, **overrides)
    convert_checkpoint(source, out_dir)
"""

from uniperceiver.modeling.model_dir import load_model, save_model
from uniperceiver.modeling.model_config import SIZES, ModelConfig, model_config
from uniperceiver.modeling.encoder import KVCache
from uniperceiver.modeling.masks import caption_mask
from uniperceiver.modeling.model import Segment, TextSegment, UniPerceiver, VisualSegment, build_model

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
