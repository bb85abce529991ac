"""The typed options of every task family, in one module that imports no torch.

Why here and not beside each family: the recipe schema, the catalog, `upctl validate` and
`upctl tasks` check and show options without building a task, and the family modules import torch.
Each family module imports its class from here and declares it as `Task.Options`
(`ImageClassification.Options is ClassificationOptions`); the catalog maps a family name to its
class (`catalog.family_options`). What each option means is told beside the family that reads it
(classification.py, captioning.py, retrieval.py, mlm.py, vqa.py, glue.py, custom.py; the media
options in _vision_io.py); the fields' comments here say type, default and rule.

Checks between fields run in `check()`; checks that need the model (`check_model(model_cfg)`: patch
multiples, text positions, logit-scale names) read only `ModelConfig`, which imports no torch either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from uniperceiver.errors import ConfigError
from uniperceiver.modeling.model_config import ModelConfig
from uniperceiver.tasks.options import (
    FieldError,
    TaskOptions,
    TrainOptions,
    check_max_len,
    check_scale,
    check_value,
    opt,
    suggest,
)

__all__ = [
    "CLOZE_WORDS",
    "GLUE_KEYS",
    "SAMPLING_MODES",
    "TARGET_KINDS",
    "VOCAB_CHOICES",
    "CaptionOptions",
    "ClassificationOptions",
    "CustomOptions",
    "GlueOptions",
    "MLMOptions",
    "MediaOptions",
    "RetrievalOptions",
    "VQAOptions",
    "glue_key",
    "parse_views",
]


# -- media (image_cls, video_cls, caption, retrieval) ---------------------------------------------

SAMPLING_MODES = ("stride", "uniform")


def parse_views(value: Any, where: str) -> tuple[int, int]:
    """"4x3" / [4, 3] / 3 -> (temporal, spatial); a bare int means spatial views only."""
    try:
        if isinstance(value, str):
            parts = value.lower().replace(" ", "").split("x")
            if len(parts) != 2:
                raise ValueError
            t, s = int(parts[0]), int(parts[1])
        elif isinstance(value, (list, tuple)) and len(value) == 2 and not any(isinstance(v, bool) for v in value):
            t, s = int(value[0]), int(value[1])
        elif isinstance(value, int) and not isinstance(value, bool):
            t, s = 1, int(value)
        else:
            raise ValueError
    except (TypeError, ValueError):
        raise FieldError(where, f"{value!r} is not a number of views; expected 'TxS' (temporal x spatial, "
                                "e.g. '4x3'), [T, S] or an int") from None
    if t < 1 or s < 1:
        raise FieldError(where, f"{value!r}: both numbers of views must be >= 1")
    return t, s


@dataclass(frozen=True)
class MediaOptions(TrainOptions):
    """The media options of the vision families (each is described in the docstring of
    uniperceiver/tasks/_vision_io.py); None = a default that depends on the model or on the family
    (`_vision_io.vision_options` resolves it)."""

    #: Crop size of images and video frames; None = the model's image_size.
    image_size: int | None = opt(None, gt=0)
    #: Shorter side before the evaluation center crop; None = image_size * 256/224 (classification) or image_size.
    eval_resize: int | None = opt(None, gt=0)
    #: Frames per clip; None = min(8, the model's max_frames).
    frames: int | None = opt(None, gt=0)
    #: Frame stride at `target_fps` (reference 32).
    stride: int = opt(32, gt=0)
    #: "stride" (reference rule) or "uniform" (centres of equal segments of the sample's window).
    sampling: str = opt("stride", choices=SAMPLING_MODES)
    #: The frame rate `stride` is counted in.
    target_fps: float = opt(30.0, gt=0)
    #: Evaluation views (temporal, spatial), given as "TxS", [T, S] or S; None = 1x3 (classification) or 1x1.
    views: tuple[int, int] | None = opt(None, parse=parse_views)
    #: Random horizontal flips in training (off for digits, text in images).
    hflip: bool = True
    #: Area range of the classification training crop (ImageNet rule [0.08, 1]).
    crop_scale: tuple[float, float] = opt((0.08, 1.0))

    def check(self) -> None:
        super().check()
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise FieldError("crop_scale", f"{list(self.crop_scale)}; expected 0 < low <= high <= 1 (area fractions)")
        if self.eval_resize is not None and self.image_size is not None and self.eval_resize < self.image_size:
            raise FieldError("eval_resize", f"eval_resize={self.eval_resize} must be >= image_size={self.image_size}")

    #: Options that only video clips read, and options that only images read: set on the other media
    #: they would change nothing, so `check_media` refuses them instead of ignoring them.
    VIDEO_ONLY = ("frames", "stride", "sampling", "target_fps", "views")
    IMAGE_ONLY = ("eval_resize", "crop_scale")

    def check_media(self, media: str) -> None:
        """Refuse an option the task's media never reads (`frames` on an image dataset, `eval_resize`
        on a video one), naming it; an option left at its default is never refused."""
        unused = self.VIDEO_ONLY if media == "image" else self.IMAGE_ONLY if media == "video" else ()
        changed = self.changed()
        for key in unused:
            if key in changed:
                other = "video clips" if media == "image" else "images"
                raise FieldError(key, f"{changed[key]!r} is read for {other} only; this task's dataset holds "
                                      f"{media} media, where it would change nothing (remove it)")

    def check_model(self, model_cfg: ModelConfig) -> None:
        super().check_model(model_cfg)
        size = self.image_size or model_cfg.image_size
        if size % model_cfg.patch_size:
            raise FieldError("image_size", f"image_size={size} must be a multiple of the patch size {model_cfg.patch_size}")
        if self.eval_resize is not None and self.eval_resize < size:
            raise FieldError("eval_resize", f"eval_resize={self.eval_resize} must be >= image_size={size}")
        if self.frames is not None and self.frames > model_cfg.max_frames:
            raise FieldError("frames", f"frames={self.frames} exceeds the model's temporal table "
                                       f"({model_cfg.max_frames} frames)")


# -- classification (image_cls, video_cls) --------------------------------------------------------

TARGET_KINDS = ("names", "images")


def _check_examples(spec: dict | None, key: str = "target_examples") -> None:
    """`{class: [media paths]}` or `{per_class: N, split: S, seed: K}` (classes are resolved by the task)."""
    if spec is None:
        return
    if not spec:
        raise FieldError(key, "is empty; expected {class: [media paths]} or {per_class: N, split: S}")
    if "per_class" in spec:
        extra = sorted(str(k) for k in spec if k not in ("per_class", "split", "seed"))
        if extra:
            raise FieldError(f"{key}.{extra[0]}", "unknown key with per_class (allowed: per_class, split, seed)")
        check_value(spec["per_class"], int, f"{key}.per_class", {"ge": 1})
        check_value(spec.get("split", "train"), str, f"{key}.split")
        check_value(spec.get("seed", 0), int, f"{key}.seed", {"ge": 0})
        return
    for cls, paths in spec.items():
        check_value([paths] if isinstance(paths, str) else paths, list[str], f"{key}.{cls}")
        if not paths:
            raise FieldError(f"{key}.{cls}", "needs at least one media path")


@dataclass(frozen=True)
class ClassificationOptions(MediaOptions):
    """Options of image and video classification (media options: `MediaOptions`)."""

    #: Mixup alpha (0 = off); reference ImageNet-21k 0.8.
    mixup: float = opt(0.0, ge=0)
    #: Cutmix alpha (0 = off); reference ImageNet-21k 1.0.
    cutmix: float = opt(0.0, ge=0)
    #: Probability that a batch is mixed at all (timm `prob`).
    mixup_prob: float = opt(1.0, ge=0, le=1)
    #: Probability of cutmix rather than mixup when both are on (timm `switch_prob`).
    mixup_switch_prob: float = opt(0.5, ge=0, le=1)
    #: Class text = template.format(name).
    template: str = "{}"
    #: Token length of a class text, with the EOT.
    target_max_len: int = opt(30, ge=2)
    #: "names" (class texts) or "images" (example images per class, see `target_examples`).
    targets: str = opt("names", choices=TARGET_KINDS)
    #: Example images with targets=images: {class (index or name): [media paths]} or {per_class: N, split: S, seed: K}.
    target_examples: dict[str | int, Any] | None = None
    #: Draw one listed synonym per class per training batch when the dataset has them (ImageNet-21k).
    synonyms: bool = True

    def check(self) -> None:
        super().check()
        if "{}" not in self.template:
            raise FieldError("template", f"{self.template!r} must contain '{{}}' where the class name goes")
        if self.targets == "images" and not self.target_examples:
            raise FieldError("target_examples", "is required with targets=images: "
                                                "{class: [media paths]} or {per_class: N, split: S}")
        _check_examples(self.target_examples)

    def check_model(self, model_cfg: ModelConfig) -> None:
        super().check_model(model_cfg)
        check_max_len(self.target_max_len, model_cfg, "target_max_len")


def _check_no_crop_scale(crop_scale: tuple[float, float]) -> None:
    """Captioning and retrieval train with the reference resize + random crop, which has no area
    range: a `crop_scale` other than the default would be silently ignored, so it is refused."""
    if tuple(crop_scale) != MediaOptions.crop_scale:
        raise FieldError("crop_scale", f"{list(crop_scale)}: applies to classification's random resized crop; "
                                       "captioning and retrieval train with the reference resize + random crop")


# -- captioning -----------------------------------------------------------------------------------

VOCAB_CHOICES = ("full", "corpus")


def _parse_spice(value: Any, key: str) -> bool | str:
    if isinstance(value, bool) or value == "auto":
        return value
    raise FieldError(key, f"{value!r}; expected true, false or 'auto' (only when SPICE's jars are installed)")


@dataclass(frozen=True)
class CaptionOptions(MediaOptions):
    """Options of image and video captioning (media options: `MediaOptions`; one view per sample)."""

    #: Caption length in tokens with the EOT (reference: 30 downstream, 50 in pre-training).
    max_len: int = opt(30, ge=2)
    #: "full": all 49,411 vocabulary entries are targets (reference); "corpus": only the training captions' ids.
    vocab: str = opt("full", choices=VOCAB_CHOICES)
    #: Beam search width at evaluation (reference 2).
    beam_size: int = opt(2, ge=1)
    #: Longest generated caption in tokens (reference 21).
    max_gen_len: int = opt(21, ge=1)
    #: Length penalty of the beam search (reference 0 for COCO, 2.0 for MSVD).
    length_penalty: float = 0.0
    #: Compute METEOR (needs Java).
    meteor: bool = True
    #: true, false or "auto" (only when SPICE's jars are installed).
    spice: bool | str = opt("auto", parse=_parse_spice)

    def check(self) -> None:
        super().check()
        if self.views not in (None, (1, 1)):
            raise FieldError("views", f"{list(self.views)}; captioning decodes one view per sample, so views must be 1x1")
        _check_no_crop_scale(self.crop_scale)

    def check_model(self, model_cfg: ModelConfig) -> None:
        super().check_model(model_cfg)
        check_max_len(self.max_len, model_cfg)
        check_max_len(self.max_gen_len, model_cfg, "max_gen_len")


# -- retrieval ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RetrievalOptions(MediaOptions):
    """Options of image-text and video-text retrieval (media options: `MediaOptions`)."""

    #: Label smoothing of both directions' cross entropy (reference 0.1).
    label_smoothing: float = opt(0.1, ge=0, lt=1)
    #: Caption length in tokens with the EOT (reference: 30 downstream, 50 in pre-training).
    max_len: int = opt(30, ge=2)
    #: Score all ranks' features (differentiable all-gather); None = the run decides (train.gather_features).
    gather_features: bool | None = None

    def check(self) -> None:
        super().check()
        _check_no_crop_scale(self.crop_scale)

    def check_model(self, model_cfg: ModelConfig) -> None:
        super().check_model(model_cfg)
        check_max_len(self.max_len, model_cfg)


# -- masked language modelling --------------------------------------------------------------------

@dataclass(frozen=True)
class MLMOptions(TrainOptions):
    """Options of masked language modelling."""

    #: Sequence length in tokens (reference 128); at most the model's text positions.
    max_len: int = opt(128, ge=2)
    #: Lines are packed until a sample holds this many words; None = max_len (reference).
    min_words: int | None = opt(None, ge=1)
    #: Probability that a word is chosen for masking (reference 0.15).
    mask_prob: float = opt(0.15, gt=0, le=1)
    #: "full": all 49,411 vocabulary entries are targets (reference); "corpus": only the corpus's ids.
    vocab: str = opt("full", choices=("full", "corpus"))
    #: Seed of the evaluation masking (every evaluation of a split masks the same tokens).
    eval_seed: int = opt(0, ge=0)

    def check_model(self, model_cfg: ModelConfig) -> None:
        super().check_model(model_cfg)
        check_max_len(self.max_len, model_cfg)


# -- VQA ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VQAOptions(TrainOptions):
    """Options of answer-list VQA."""

    #: Question length in tokens with `<|spe|> <|endoftext|>` (reference 23).
    max_len: int = opt(23, ge=3)
    #: Token length of an answer target, with the EOT.
    answer_max_len: int = opt(16, ge=2)
    #: Image crop size; None = the model's image_size.
    image_size: int | None = opt(None, gt=0)
    #: "reference" (resize, random crop, flip) or "random_resized" (the ImageNet crop).
    train_transform: str = opt("reference", choices=("reference", "random_resized"))
    #: Random horizontal flips in training (swapping "left" and "right" in question and answers).
    hflip: bool = True
    #: Logit scale (temperature) name; None = the family's "downstream".
    scale: str | None = None
    #: Fixed temperature tau (logits = cosine / tau) instead of the learnable scale; reference fine-tuning 0.03.
    fixed_temperature: float | None = opt(None, gt=0)

    def check_model(self, model_cfg: ModelConfig) -> None:
        super().check_model(model_cfg)
        check_max_len(self.max_len, model_cfg)
        check_max_len(self.answer_max_len, model_cfg, "answer_max_len")
        check_scale(self.scale, model_cfg)
        size = self.image_size or model_cfg.image_size
        if size % model_cfg.patch_size:
            raise FieldError("image_size", f"image_size={size} must be a multiple of the patch size {model_cfg.patch_size}")


# -- GLUE as a cloze ------------------------------------------------------------------------------

#: The reference cloze words of each GLUE task, in label order (glue.py builds the prompts).
CLOZE_WORDS: dict[str, list[str]] = {
    "sst2": ["bad", "wonderful"],
    "cola": ["incorrect", "correct"],
    "mrpc": ["no", "yes"],
    "qqp": ["no", "yes"],
    "qnli": ["no", "yes"],
    "rte": ["no", "yes"],
    "wnli": ["no", "yes"],
    "stsb": ["no", "yes"],
    "mnli": ["no", "maybe", "yes"],
}
GLUE_KEYS = tuple(CLOZE_WORDS)
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli-mm": "mnli", "mnli_match": "mnli",
            "mnli_mismatch": "mnli"}


def glue_key(name: str) -> str:
    """'glue-sst2' / 'SST-2' / 'sst2' -> 'sst2' (ConfigError for anything else)."""
    key = str(name).strip().lower().removeprefix("glue-")
    key = _ALIASES.get(key, key)
    if key not in CLOZE_WORDS:
        raise ConfigError(f"GLUE task {name!r} is unknown; expected one of {', '.join(GLUE_KEYS)}")
    return key


@dataclass(frozen=True)
class GlueOptions(TrainOptions):
    """Options of GLUE as a cloze."""

    #: Which GLUE prompt (sst2, cola, mrpc, qqp, stsb, mnli, qnli, rte, wnli); None = from the dataset name.
    glue_task: str | None = None
    #: The class words, one per class in label order; None = the reference words of the task.
    words: tuple[str, ...] | None = None
    #: Sequence length in tokens (reference 256); at most the model's text positions.
    max_len: int = opt(256, ge=8)
    #: Logit scale (temperature) name; None = the family's "downstream" (the reference GLUE configs: "text_mlm").
    scale: str | None = None

    def check(self) -> None:
        super().check()
        if self.glue_task is not None:
            try:
                glue_key(self.glue_task)
            except ConfigError:
                raise FieldError("glue_task", f"{self.glue_task!r} is not a GLUE task{suggest(self.glue_task, GLUE_KEYS)} "
                                              f"(allowed: {', '.join(GLUE_KEYS)})") from None
        if self.words is not None and len(set(self.words)) != len(self.words):
            raise FieldError("words", f"{list(self.words)} repeats a word; the class words must differ")

    def check_model(self, model_cfg: ModelConfig) -> None:
        super().check_model(model_cfg)
        check_max_len(self.max_len, model_cfg)
        check_scale(self.scale, model_cfg)


# -- custom YAML tasks ----------------------------------------------------------------------------

@dataclass(frozen=True)
class CustomOptions(TaskOptions):
    """Options of a custom task (filled from its `CustomSpec`, which checks the YAML file)."""

    #: How many ranked candidates each prediction lists.
    top_k: int = opt(5, ge=1)
    #: Frames per video input (at most the model's max_frames are used).
    frames: int = opt(8, ge=1)
