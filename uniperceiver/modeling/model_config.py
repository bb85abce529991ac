"""Model hyper-parameters and the named sizes (tiny, small, base, large).

The reference sizes come from the paper / reference code: base 12 x 768 (about 124M parameters),
large 24 x 1024 (about 354M). `tiny` and `small` exist so tests and the `mini` demo run on a CPU.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from uniperceiver.errors import ConfigError

#: Logit-scale names of the reference checkpoints (one learnable temperature per task family).
LOGIT_SCALE_NAMES: tuple[str, ...] = (
    "img_cls",
    "video_cls",
    "text_mlm",
    "text_caption",
    "caption",
    "mlm",
    "retrieve",
    "tqa_mlm",
    "tqa_caption",
    "tqa_retrieve",
    "downstream",
)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a `UniPerceiver`; saved as `config.json` beside the weights."""

    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    vocab_size: int = 49411
    max_text_len: int = 512
    max_frames: int = 8
    patch_size: int = 16
    image_size: int = 224
    #: Spatial sin-cos coordinates are scaled by pos_base_size / image_size: the reference model was
    #: pre-trained at 160 px, so at 224 px a patch row r is embedded at r * 160/224.
    pos_base_size: int = 160
    layer_scale_init: float = 1e-3
    drop_path: float = 0.0
    ln_eps: float = 1e-5
    #: Deep prompt tokens per layer (prefix keys/values only); 0 disables them.
    prompt_tokens: int = 0
    #: Target sequences (class names, captions, vocabulary) get their own deep prompts instead of
    #: the inputs' (reference SHARE_DEEP_PROMPT False, its retrieval prompt tuning); needs prompt_tokens.
    target_prompts: bool = False
    #: A learnable bias added to the word embedding of every <|spe|> (prompt tuning).
    spe_bias: bool = False
    #: Zero-initialised Linear(D, n) added to similarity_weight x cosine logits (ImageNet prompt tuning); 0 = none.
    cls_head_classes: int = 0
    grad_checkpointing: bool = False
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = 100.0
    size: str = "custom"
    logit_scale_names: tuple[str, ...] = field(default=LOGIT_SCALE_NAMES)

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ConfigError(f"model.width={self.width} must be divisible by model.heads={self.heads}")
        if self.width % 4:
            raise ConfigError(f"model.width={self.width} must be divisible by 4 (2-D sin-cos positions)")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"model.image_size={self.image_size} must be a multiple of model.patch_size={self.patch_size}"
            )
        for name in ("depth", "heads", "mlp_dim", "vocab_size", "max_text_len", "max_frames"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be positive")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"model.drop_path={self.drop_path} must be in [0, 1)")
        if self.target_prompts and self.prompt_tokens <= 0:
            raise ConfigError("model.target_prompts=true needs deep prompts: set model.prompt_tokens > 0")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def pos_scale(self) -> float:
        return self.pos_base_size / self.image_size

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["logit_scale_names"] = list(self.logit_scale_names)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config key(s) {unknown}; expected some of {sorted(known)}")
        data = dict(data)
        if "logit_scale_names" in data:
            data["logit_scale_names"] = tuple(data["logit_scale_names"])
        return cls(**data)

    def replace(self, **changes: Any) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown model option(s) {unknown}; expected some of {sorted(known)}")
        return dataclasses.replace(self, **changes)


SIZES: dict[str, dict[str, Any]] = {
    # A few layers at width 192: for tests and the CPU demo.
    "tiny": dict(width=192, depth=4, heads=3, mlp_dim=768, image_size=64, pos_base_size=64),
    "small": dict(width=384, depth=12, heads=6, mlp_dim=1536),
    "base": dict(width=768, depth=12, heads=12, mlp_dim=3072),
    "large": dict(width=1024, depth=24, heads=16, mlp_dim=4096),
}


def model_config(size: str, **overrides: Any) -> ModelConfig:
    """The named size with optional overrides, e.g. `model_config("base", image_size=160)`.

    The spatial position scale follows the reference: 160 / image_size for the reference sizes.
    """
    if size not in SIZES:
        raise ConfigError(f"unknown model size {size!r}; valid sizes: {', '.join(SIZES)}")
    params = {**SIZES[size], **overrides, "size": size}
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"unknown model option(s) {unknown}; expected some of {sorted(known)}")
    return ModelConfig(**params)
