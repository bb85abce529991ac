"""Image-text and video-text retrieval: both sides encoded separately, read at their SPE prefix.

Training (reference): each image (or clip) is paired with ONE caption drawn at random every step;
the in-batch similarity matrix scaled by the "retrieve" temperature is scored in both directions
with label-smoothed (0.1) cross entropy. The reference SUMS the two losses (its trainer adds every
entry of the loss dict: `i2t` and `t2i`), so `loss = CE_i2t + CE_t2i`; the pre-training recipes then
weight the task by 0.5. With `gather_features` on and torch.distributed initialised, features of
every rank are gathered with the differentiable `torch.distributed.nn.functional.all_gather`, so
each rank scores all N x N pairs (the reference gathers without gradient, which scales the
gradient by 1/world; ours is the exact gradient of the global loss).

Evaluation: every image once and every caption (`caption <|endoftext|>`) once, normalised, no
temperature; `metrics.image_text_retrieval` gives R@1/5/10 both ways, median / mean rank and rsum.

Options (`RetrievalOptions`): media options of `_vision_io` (video: `frames`, `stride`, `sampling`;
several eval views are averaged and renormalised), `max_len` (30 tokens with the EOT; the reference
uses 50 in pre-training), `label_smoothing` (0.1), `gather_features` (None: the run decides through
`set_feature_gathering`; true / false: this task's own choice).
Predictions: {"id", "image_feat": [D] tensor, "text_feats": [n_captions, D] tensor}.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from uniperceiver.data.format import PreparedDataset
from uniperceiver.errors import ConfigError, DataError
from uniperceiver.metrics import image_text_retrieval
from uniperceiver.modeling.model import UniPerceiver, VisualSegment
from uniperceiver.modeling.model_config import ModelConfig
from uniperceiver.tasks._vision_io import load_visual, stack_pixels, vision_options
from uniperceiver.tasks.base import Task, TaskConfig
from uniperceiver.tasks.family_options import RetrievalOptions
from uniperceiver.tokenizers.text import ClipTokenizer
from uniperceiver.utils.collectives import all_gather_with_grad

__all__ = ["Retrieval", "RetrievalOptions", "gather_features", "sample_texts"]


def sample_texts(sample: dict, where: str) -> list[str]:
    """The non-empty captions of a sample, or a DataError naming it."""
    texts = sample.get("texts")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise DataError(f"{where} sample {sample.get('id')!r}: 'texts' must be a non-empty list of captions")
    return texts


def gather_features(*feats: Tensor) -> tuple[Tensor, ...]:
    """Concatenate features of every rank in rank order, keeping gradients (differentiable all-gather).

    Every rank then computes the same global loss; the backward pass sums the gradient of each
    rank's rows over all ranks (world x the global gradient), so DDP's averaging yields exactly the
    gradient of the global loss. Ranks must hold the same number of rows (equal batch sizes).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return feats
    return tuple(all_gather_with_grad(f) for f in feats)


class Retrieval(Task):
    """Image-text or video-text retrieval by the dataset's media type."""

    family = "retrieval"
    Options = RetrievalOptions
    opts: RetrievalOptions
    scale = "retrieve"
    modality = "image"

    def __init__(self, cfg: TaskConfig, dataset: PreparedDataset, tokenizer: ClipTokenizer, model_cfg: ModelConfig) -> None:
        super().__init__(cfg, dataset, tokenizer, model_cfg)
        kind = dataset.media_type
        if kind not in ("image", "video"):
            raise DataError(f"dataset {dataset.name!r} has media_type {kind!r}; retrieval needs image or video media")
        self.modality = kind  # instance attribute: image-text or video-text
        self.vision = vision_options(self.opts, model_cfg, purpose="pair", media=kind, task=cfg.name)
        self.max_len = self.opts.max_len
        self.label_smoothing = self.opts.label_smoothing
        self.gather = bool(self.opts.gather_features)

    def set_feature_gathering(self, enabled: bool) -> None:
        """The run's decision, unless option `gather_features` is set (true or false) for this task."""
        if self.opts.gather_features is None:
            self.gather = bool(enabled)

    # -- data --------------------------------------------------------------------------------
    def load(self, sample: dict, *, train: bool, rng: np.random.Generator) -> dict:
        texts = sample_texts(sample, str(self.dataset.root))
        if train:
            texts = [texts[int(rng.integers(len(texts)))]]
        pixels = load_visual(self.dataset, sample, self.vision, train=train, rng=rng)
        return {"id": str(sample["id"]), "pixels": pixels, "texts": list(texts)}

    def collate(self, items: list[dict], *, train: bool, rng: np.random.Generator) -> dict[str, Any]:
        texts = [t for it in items for t in it["texts"]]
        ids, valid = self.tokenizer.encode_batch(texts, self.max_len)
        return {
            "ids": [it["id"] for it in items],
            "pixels": stack_pixels(items),
            "text_ids": ids,
            "text_valid": valid,
            "caption_counts": [len(it["texts"]) for it in items],
        }

    # -- model -------------------------------------------------------------------------------
    def encode_visual(self, model: UniPerceiver, pixels: Tensor) -> Tensor:
        """[B, D]; eval clips with several views [B, V, F, 3, H, W] -> mean of views, renormalised."""
        pixels = pixels.to(model.device)
        if pixels.dim() == 6:
            b, v = pixels.shape[:2]
            f = model.encode([VisualSegment(pixels.flatten(0, 1))]).view(b, v, -1)
            return F.normalize(f.mean(1), dim=-1) if v > 1 else f[:, 0]
        return model.encode([VisualSegment(pixels)])

    def encode_texts(self, model: UniPerceiver, ids: Tensor, valid: Tensor) -> Tensor:
        return model.encode_text(ids.to(model.device), valid.to(model.device))

    def loss(self, model: UniPerceiver, batch: dict[str, Any], targets: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        if any(n != 1 for n in batch["caption_counts"]):
            raise ConfigError(f"task {self.cfg.name!r}: training batches need exactly one caption per sample (load with train=True)")
        img = self.encode_visual(model, batch["pixels"])
        txt = self.encode_texts(model, batch["text_ids"], batch["text_valid"])
        if self.gather:
            img, txt = gather_features(img, txt)
        logits = model.logits(img, txt, self.scale).float()  # [N images, N captions]
        labels = torch.arange(logits.shape[0], device=logits.device)
        i2t = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        t2i = F.cross_entropy(logits.t(), labels, label_smoothing=self.label_smoothing)
        with torch.no_grad():
            stats = {
                "loss_i2t": float(i2t.item()),
                "loss_t2i": float(t2i.item()),
                "acc_i2t": float((logits.argmax(1) == labels).float().mean().item() * 100.0),
                "acc_t2i": float((logits.argmax(0) == labels).float().mean().item() * 100.0),
            }
        return i2t + t2i, stats

    def evaluate_batch(self, model: UniPerceiver, batch: dict[str, Any], targets: Tensor | None) -> list[dict]:
        with torch.no_grad():
            img = self.encode_visual(model, batch["pixels"]).float().cpu()
            txt = self.encode_texts(model, batch["text_ids"], batch["text_valid"]).float().cpu()
        out, start = [], 0
        for i, (sid, n) in enumerate(zip(batch["ids"], batch["caption_counts"])):
            out.append({"id": sid, "image_feat": img[i], "text_feats": txt[start : start + n]})
            start += n
        return out

    def compute_metrics(self, predictions: list[dict]) -> dict[str, float]:
        if not predictions:
            raise DataError(f"task {self.cfg.name!r}: no predictions to score")
        img = torch.stack([torch.as_tensor(p["image_feat"]) for p in predictions])
        txts = [torch.as_tensor(p["text_feats"]).reshape(-1, img.shape[1]) for p in predictions]
        owner = torch.cat([torch.full((t.shape[0],), i, dtype=torch.long) for i, t in enumerate(txts)])
        return image_text_retrieval(img, torch.cat(txts), owner)
