"""Image and video classification in the unified form: the SPE feature of the input vs encoded classes.

Layout (reference): the input is `[SPE] + visual`, read at position 0; every class is
`[SPE] + "name <|endoftext|>"` read at position 0; logits are cosine similarities times the
family's clamped temperature ("img_cls" / "video_cls"). Training uses a soft-target cross entropy:
one-hot targets smoothed by `label_smoothing`, or mixup / cutmix targets (timm's batch-mode rule,
drawn from the caller's generator; the reference ImageNet-21k recipe is mixup 0.8, cutmix 1.0,
prob 1.0, switch 0.5, smoothing 0.1). The reference's LabelSmoothingCrossEntropy equals this
soft-target loss with smoothed one-hot targets.

Options (`family_options.ClassificationOptions`, besides the media options of `MediaOptions`):
- `label_smoothing` (0.0), `mixup` (alpha, 0 = off), `cutmix` (alpha, 0 = off), `mixup_prob` (1.0),
  `mixup_switch_prob` (0.5);
- `template` ("{}"): class text = template.format(name); `target_max_len` (30 tokens);
- `synonyms` (True): when the dataset lists synonyms per class (ImageNet-21k), training may draw one
  per class per batch through `training_target_set(rng)`; `target_set()` always gives the first name;
- `targets` ("names" | "images") and `target_examples`: class targets given as EXAMPLE IMAGES, a
  zero-shot task type of this project: `{class (index or name): [media paths]}` (relative to the
  dataset's raw root, or absolute) or `{"per_class": N, "split": S, "seed": 0}` (N seeded picks per
  class from split S). A class embedding is the mean of the normalised features of its examples,
  renormalised; see `encode_target_set`.

Hooks of `Task` this family overrides: `target_set_varies` (synonyms), `training_target_set(rng)`,
`targets_are_texts` (False for example images) and `encode_target_set(model, ts)`.

Predictions (one per sample): {"id", "label", "pred", "top5": [class ids], "scores": [their
probabilities]}; video evaluation averages the softmax of every view (temporal x spatial).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from uniperceiver.data.format import PreparedDataset
from uniperceiver.errors import ConfigError, DataError
from uniperceiver.modeling.model import UniPerceiver, VisualSegment
from uniperceiver.modeling.model_config import ModelConfig
from uniperceiver.tasks._vision_io import load_visual, stack_pixels, vision_options
from uniperceiver.tasks.base import TargetSet, Task, TaskConfig, encode_targets, text_target_set
from uniperceiver.tasks.family_options import ClassificationOptions
from uniperceiver.tokenizers.text import EOT_ID, ClipTokenizer

__all__ = ["ClassificationOptions", "ImageClassification", "VideoClassification", "mix_batch", "smooth_one_hot", "soft_cross_entropy", "topk_from_predictions"]

# ------------------------------------------------------------------------------ losses and mixing


def smooth_one_hot(labels: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """timm's targets: on = 1 - s + s / C, off = s / C (rows sum to 1)."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32)
    out.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)
    return out


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """mean over rows of sum_c -t_c log softmax(logits)_c (reference SoftTargetCrossEntropy)."""
    return torch.sum(-targets.to(logits.dtype) * F.log_softmax(logits, dim=-1), dim=-1).mean()


def mix_batch(
    pixels: Tensor,
    labels: Tensor,
    num_classes: int,
    rng: np.random.Generator,
    *,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Batch-mode mixup / cutmix (timm's `Mixup` rule) with an explicit generator.

    Each sample is mixed with the batch reversed. With probability `prob` one of the two is
    applied (cutmix with `switch_prob` when both are on), lambda ~ Beta(alpha, alpha); cutmix
    pastes a box of area (1 - lambda) and corrects lambda to the pasted area. Works on images
    [B, 3, H, W] and clips [B, T, 3, H, W] (the same box in every frame). Returns (pixels, soft
    targets [B, C] whose rows sum to 1, {"lam", "cutmix"}).
    """
    lam, use_cutmix = 1.0, False
    if (mixup_alpha > 0 or cutmix_alpha > 0) and rng.random() < prob:
        if mixup_alpha > 0 and cutmix_alpha > 0:
            use_cutmix = bool(rng.random() < switch_prob)
            alpha = cutmix_alpha if use_cutmix else mixup_alpha
        elif mixup_alpha > 0:
            alpha = mixup_alpha
        else:
            use_cutmix, alpha = True, cutmix_alpha
        lam = float(rng.beta(alpha, alpha))
    out = pixels.clone()
    if lam < 1.0:
        flipped = pixels.flip(0)
        if use_cutmix:
            h, w = pixels.shape[-2:]
            ratio = np.sqrt(1.0 - lam)
            cut_h, cut_w = int(h * ratio), int(w * ratio)
            cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
            yl, yh = int(np.clip(cy - cut_h // 2, 0, h)), int(np.clip(cy + cut_h // 2, 0, h))
            xl, xh = int(np.clip(cx - cut_w // 2, 0, w)), int(np.clip(cx + cut_w // 2, 0, w))
            out[..., yl:yh, xl:xh] = flipped[..., yl:yh, xl:xh]
            lam = 1.0 - (yh - yl) * (xh - xl) / float(h * w)
        else:
            out = pixels * lam + flipped * (1.0 - lam)
    y1 = smooth_one_hot(labels, num_classes, smoothing)
    targets = y1 * lam + y1.flip(0) * (1.0 - lam)
    return out, targets, {"lam": lam, "cutmix": float(use_cutmix)}


def topk_from_predictions(predictions: list[dict]) -> dict[str, float]:
    """top-1 / top-5 accuracy (percent) from per-sample predictions.

    Equal to `metrics.topk_accuracy` on the full scores: the stored top-5 list is the ranking's head
    (it has min(5, C) entries, so top-5 of a 3-class task is 100%, as in timm).
    """
    if not predictions:
        raise DataError("no predictions to score")
    hit1 = [int(p["pred"]) == int(p["label"]) for p in predictions]
    hit5 = [int(p["label"]) in [int(c) for c in p["top5"][:5]] for p in predictions]
    return {"top1": 100.0 * float(np.mean(hit1)), "top5": 100.0 * float(np.mean(hit5))}


# ------------------------------------------------------------------------------ the task family


class ImageClassification(Task):
    """`[SPE] + image` read at 0 vs `[SPE] + "class <|endoftext|>"` (or example-image targets)."""

    family = "image_cls"
    Options = ClassificationOptions
    opts: ClassificationOptions
    scale = "img_cls"
    modality = "image"

    def __init__(self, cfg: TaskConfig, dataset: PreparedDataset, tokenizer: ClipTokenizer, model_cfg: ModelConfig) -> None:
        super().__init__(cfg, dataset, tokenizer, model_cfg)
        classes = dataset.classes
        if not classes:
            raise DataError(f"dataset {dataset.name!r} lists no classes in meta.json targets.classes; "
                            f"task {cfg.name!r} ({self.family}) needs them")
        self.classes: list[str] = [str(c) for c in classes]
        self.num_classes = len(self.classes)
        o = self.opts
        self.vision = vision_options(o, model_cfg, purpose="cls", media=dataset.media_type, task=cfg.name)
        self.label_smoothing = o.label_smoothing
        self.mixup_alpha, self.cutmix_alpha = o.mixup, o.cutmix
        self.mixup_prob, self.mixup_switch_prob = o.mixup_prob, o.mixup_switch_prob
        self.template = o.template
        self.target_max_len = o.target_max_len
        self.targets_kind = o.targets
        synonyms = dataset.synonyms if o.synonyms else None
        if synonyms is not None and len(synonyms) != self.num_classes:
            raise DataError(f"dataset {dataset.name!r}: targets.synonyms has {len(synonyms)} entries for {self.num_classes} classes")
        self.synonyms: list[list[str]] | None = [list(s) or [c] for s, c in zip(synonyms, self.classes)] if synonyms else None
        self._names_set: TargetSet | None = None
        self._synonym_tokens: list[list[list[int]]] | None = None
        self._examples: list[list[str]] | None = None  # resolved media paths per class
        self._example_pixels: list[list[Tensor]] | None = None

    # -- targets ----------------------------------------------------------------------------
    def _text_set(self, names: list[str], tag: str) -> TargetSet:
        texts = [self.template.format(n) for n in names]
        return text_target_set(f"{self.dataset.name}:{tag}", texts, self.tokenizer, self.target_max_len)

    def target_set(self) -> TargetSet:
        """The canonical candidates: class names (first synonym), or the example-image set."""
        if self.targets_kind == "images":
            return self._image_target_set()
        if self._names_set is None:
            self._names_set = self._text_set(self.classes, "classes")
        return self._names_set

    @property
    def target_set_varies(self) -> bool:
        """True when the dataset lists synonyms per class (ImageNet-21k) and targets are names."""
        return self.synonyms is not None and self.targets_kind == "names"

    @property
    def targets_are_texts(self) -> bool:
        """Class names are texts; example-image targets need `encode_target_set`."""
        return self.targets_kind == "names"

    def training_target_set(self, rng: np.random.Generator) -> TargetSet:
        """Training candidates for one batch: one synonym drawn per class (ImageNet-21k), else `target_set()`.

        The synonyms are tokenized once; each call only draws and pads (21k classes per step).
        """
        if not self.target_set_varies or self.synonyms is None:
            return self.target_set()
        if self._synonym_tokens is None:
            room = self.target_max_len - 1
            self._synonym_tokens = [
                [self.tokenizer.encode(self.template.format(s))[:room] + [EOT_ID] for s in syn] for syn in self.synonyms
            ]
        picks = [int(rng.integers(len(syn))) for syn in self.synonyms]
        rows = [toks[j] for toks, j in zip(self._synonym_tokens, picks)]
        ids = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        valid = torch.zeros_like(ids, dtype=torch.bool)
        for i, r in enumerate(rows):
            valid[i, : len(r)] = True
        labels = [syn[j] for syn, j in zip(self.synonyms, picks)]
        return TargetSet(f"{self.dataset.name}:synonyms", ids, valid, labels)

    def example_paths(self) -> list[list[str]]:
        """Media paths of every class's example targets (option `target_examples`), resolved once."""
        if self._examples is None:
            self._examples = self._resolve_examples()
        return self._examples

    def _resolve_examples(self) -> list[list[str]]:
        where = f"task {self.cfg.name!r}: options.target_examples"
        spec = self.opts.target_examples or {}  # checked by ClassificationOptions
        per_class: list[list[str]] = [[] for _ in range(self.num_classes)]
        if "per_class" in spec:
            n = int(spec["per_class"])
            split = str(spec.get("split", self.cfg.split))
            by_class: list[list[dict]] = [[] for _ in range(self.num_classes)]
            for s in self.dataset.samples(split):
                lab = s.get("label")
                if isinstance(lab, int) and 0 <= lab < self.num_classes and "media" in s:
                    by_class[lab].append(s)
            rng = np.random.default_rng(int(spec.get("seed", 0)))
            for c, rows in enumerate(by_class):
                take = sorted(rng.choice(len(rows), size=min(n, len(rows)), replace=False).tolist()) if rows else []
                per_class[c] = [str(self.dataset.media_path(rows[i])) for i in take]
        else:
            index = {name: i for i, name in enumerate(self.classes)}
            for key, paths in spec.items():
                c = _class_index(key, index, self.num_classes, where)
                for p in [paths] if isinstance(paths, str) else paths:
                    if p.startswith("/"):
                        per_class[c].append(p)
                    else:
                        per_class[c].append(str(self.dataset.media_path({"id": f"target-example-{key}", "media": p})))
        missing = [self.classes[c] for c, ps in enumerate(per_class) if not ps]
        if missing:
            raise ConfigError(f"{where}: no example for class(es) {missing[:5]}; every class needs at least one")
        return per_class

    def _image_target_set(self) -> TargetSet:
        paths = self.example_paths()
        h = hashlib.sha256(f"{self.dataset.name}|{self.vision}".encode())
        for ps in paths:
            h.update(("\n".join(ps) + "\0").encode())
        ids = torch.zeros(self.num_classes, 1, dtype=torch.long)
        return TargetSet(f"{self.dataset.name}:example-images", ids, torch.ones_like(ids, dtype=torch.bool),
                         list(self.classes), key="img" + h.hexdigest()[:13])

    def _load_example_pixels(self) -> list[list[Tensor]]:
        if self._example_pixels is None:
            from uniperceiver.tasks._vision_io import image_pixels, video_pixels

            rng = np.random.default_rng(0)  # evaluation transforms draw nothing
            out = []
            for ps in self.example_paths():
                views = []
                for p in ps:
                    if p.lower().endswith((".mp4", ".avi", ".mkv", ".webm", ".mov")):
                        views.extend(video_pixels(p, self.vision, train=False, rng=rng).unbind(0))
                    else:
                        views.append(image_pixels(p, self.vision, train=False, rng=rng))
                out.append(views)
            self._example_pixels = out
        return self._example_pixels

    def encode_target_set(self, model: UniPerceiver, targets: TargetSet, chunk: int = 64) -> Tensor:
        """[C, D]: class names through `encode_targets`, or the renormalised mean of example features."""
        if self.targets_kind != "images":
            return encode_targets(model, targets)
        per_class = self._load_example_pixels()
        flat = [(c, px) for c, views in enumerate(per_class) for px in views]
        groups: dict[tuple, list[int]] = {}
        for i, (_, px) in enumerate(flat):
            groups.setdefault(tuple(px.shape), []).append(i)
        all_feats: list[Tensor | None] = [None] * len(flat)
        for idx in groups.values():
            for start in range(0, len(idx), chunk):
                part = idx[start : start + chunk]
                px = torch.stack([flat[i][1] for i in part]).to(model.device)
                f = model.encode([VisualSegment(px)], temporal_offset=0)
                for j, i in enumerate(part):
                    all_feats[i] = f[j]
        owner = torch.tensor([c for c, _ in flat], device=model.device)
        stacked = torch.stack(all_feats)  # type: ignore[arg-type]
        sums = torch.zeros(self.num_classes, stacked.shape[1], device=stacked.device, dtype=stacked.dtype)
        sums = sums.index_add(0, owner, stacked)
        feats = sums / torch.bincount(owner, minlength=self.num_classes).unsqueeze(1).to(stacked.dtype)
        return F.normalize(feats, dim=-1)

    # -- data --------------------------------------------------------------------------------
    def load(self, sample: dict, *, train: bool, rng: np.random.Generator) -> dict:
        label = sample.get("label")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < self.num_classes:
            raise DataError(f"{self.dataset.root} sample {sample.get('id')!r}: label {label!r} must be an int in "
                            f"[0, {self.num_classes - 1}]")
        pixels = load_visual(self.dataset, sample, self.vision, train=train, rng=rng)
        return {"id": str(sample["id"]), "pixels": pixels, "label": label}

    def collate(self, items: list[dict], *, train: bool, rng: np.random.Generator) -> dict[str, Any]:
        pixels = stack_pixels(items)
        labels = torch.tensor([it["label"] for it in items], dtype=torch.long)
        batch: dict[str, Any] = {"ids": [it["id"] for it in items], "pixels": pixels, "labels": labels}
        if train:
            if self.mixup_alpha > 0 or self.cutmix_alpha > 0:
                pixels, targets, info = mix_batch(
                    pixels, labels, self.num_classes, rng, mixup_alpha=self.mixup_alpha,
                    cutmix_alpha=self.cutmix_alpha, prob=self.mixup_prob, switch_prob=self.mixup_switch_prob,
                    smoothing=self.label_smoothing)
                batch.update(pixels=pixels, mix=info)
            else:
                targets = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
            batch["targets"] = targets
        return batch

    # -- model -------------------------------------------------------------------------------
    def _logits(self, model: UniPerceiver, pixels: Tensor, targets: Tensor) -> Tensor:
        # Cosine x temperature, plus the fc prompt head on the un-normalised ln_post + proj features
        # when the model carries one for this class set (reference: embed_cls_predictor.py).
        return model.class_logits([VisualSegment(pixels.to(model.device))], targets, self.scale)

    def loss(self, model: UniPerceiver, batch: dict[str, Any], targets: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        if targets is None:
            raise ConfigError(f"task {self.cfg.name!r}: classification needs encoded class targets")
        if targets.shape[0] != self.num_classes:
            raise ConfigError(f"task {self.cfg.name!r}: {targets.shape[0]} target features for {self.num_classes} classes")
        logits = self._logits(model, batch["pixels"], targets)
        soft = batch.get("targets")
        if soft is None:
            soft = smooth_one_hot(batch["labels"], self.num_classes, self.label_smoothing)
        soft = soft.to(logits.device)
        loss = soft_cross_entropy(logits.float(), soft)
        with torch.no_grad():
            acc = (logits.argmax(-1) == soft.argmax(-1)).float().mean().item() * 100.0
        return loss, {"acc": acc}

    @torch.no_grad()
    def class_probabilities(self, model: UniPerceiver, pixels: Tensor, targets: Tensor) -> Tensor:
        """[B, C] probabilities; several views per sample ([B, V, ...] clips) -> mean of per-view softmax."""
        if pixels.dim() == 6:  # [B, V, F, 3, H, W]: evaluation views of clips
            b, v = pixels.shape[:2]
            logits = self._logits(model, pixels.flatten(0, 1), targets).view(b, v, -1)
            return logits.float().softmax(-1).mean(1)
        return self._logits(model, pixels, targets).float().softmax(-1)

    def evaluate_batch(self, model: UniPerceiver, batch: dict[str, Any], targets: Tensor | None) -> list[dict]:
        if targets is None:
            raise ConfigError(f"task {self.cfg.name!r}: classification needs encoded class targets")
        probs = self.class_probabilities(model, batch["pixels"], targets).cpu()
        k = min(5, probs.shape[1])
        top = probs.topk(k, dim=1)
        preds = []
        for i, sid in enumerate(batch["ids"]):
            preds.append({
                "id": sid,
                "label": int(batch["labels"][i]),
                "pred": int(top.indices[i, 0]),
                "top5": [int(c) for c in top.indices[i]],
                "scores": [float(s) for s in top.values[i]],
            })
        return preds

    def compute_metrics(self, predictions: list[dict]) -> dict[str, float]:
        return topk_from_predictions(predictions)


class VideoClassification(ImageClassification):
    """The same layout on clips; evaluation averages the softmax over temporal x spatial views."""

    family = "video_cls"
    scale = "video_cls"
    modality = "video"


def _class_index(key: Any, index: dict[str, int], n: int, where: str) -> int:
    if isinstance(key, int) and not isinstance(key, bool):
        c = key
    elif isinstance(key, str) and key.strip().lstrip("-").isdigit():
        c = int(key)
    elif isinstance(key, str) and key in index:
        return index[key]
    else:
        raise ConfigError(f"{where}: unknown class {key!r}; use a class index 0..{n - 1} or one of the class names")
    if not 0 <= c < n:
        raise ConfigError(f"{where}: class index {c} out of range 0..{n - 1}")
    return c
