"""Image and video captioning: teacher-forced queries scored against the vocabulary target set.

Training layout (reference-conventions.md, "Task layouts"):
`[SPE] + visual + words(T) + queries(T)` where words = caption + `<|endoftext|>` (no start token)
and queries = one `<|spe|>` per word; words and queries are each padded to the batch's longest T
with id 0, both use text positions 0..T-1, and `caption_mask(context, T)` (context = 1 + visual
tokens) is combined with key padding. Query i is read out and predicts word i; padded queries are
ignored. Targets are the vocabulary "word classifier" (`vocab_target_set`): option `vocab` "full"
(all 49,411 ids, reference) or "corpus" (only the ids of the training captions + EOT: a documented
deviation that makes small models and CPU runs affordable; labels index into that subset).
Logits use the "caption" temperature; loss = cross entropy with optional `label_smoothing`.

Evaluation: beam search on the KV cache (`uniperceiver.modeling.decoding.beam_search`; options
`beam_size` 2, `max_gen_len` 21, `length_penalty` 0.0), detokenised, scored with the COCO caption
tools (`caption_metrics.caption_scores`, PTB tokenizer and METEOR need Java; option `meteor`
(True), `spice` ("auto")). Metrics are reported x 100 (BLEU-4 36.4, CIDEr 116.9, as in the paper
tables), keys Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr (and SPICE when computed).
Training draws one of the sample's captions at random every step. Option `max_len` (30 tokens with
the EOT; the reference pre-training uses 50).
Predictions: {"id", "caption", "references"}.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from uniperceiver.data.format import PreparedDataset
from uniperceiver.errors import ConfigError, DataError
from uniperceiver.metrics.captions import caption_scores
from uniperceiver.modeling.decoding import beam_search
from uniperceiver.modeling.masks import caption_mask
from uniperceiver.modeling.model import TextSegment, UniPerceiver, VisualSegment
from uniperceiver.modeling.model_config import ModelConfig
from uniperceiver.tasks._vision_io import load_visual, stack_pixels, vision_options
from uniperceiver.tasks.base import TargetSet, Task, TaskConfig, vocab_target_set
from uniperceiver.tasks.family_options import CaptionOptions
from uniperceiver.tasks.retrieval import sample_texts
from uniperceiver.tokenizers.text import EOT_ID, PAD_ID, SPE_ID, VOCAB_SIZE, ClipTokenizer

__all__ = ["CaptionOptions", "Captioning", "caption_batch"]

IGNORE = -100


def caption_batch(words: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher-forced text segment from padded words [B, T]: (ids [B, 2T], valid [B, 2T], positions [2T]).

    Queries are `<|spe|>` where the word is real and padding (0, invalid) elsewhere.
    """
    queries = torch.where(valid, torch.full_like(words, SPE_ID), torch.full_like(words, PAD_ID))
    t = words.shape[1]
    pos = torch.arange(t)
    return torch.cat([words, queries], 1), torch.cat([valid, valid], 1), torch.cat([pos, pos])


class Captioning(Task):
    """Captioning of images or clips by the dataset's media type."""

    family = "caption"
    Options = CaptionOptions
    opts: CaptionOptions
    scale = "caption"
    modality = "image"

    def __init__(self, cfg: TaskConfig, dataset: PreparedDataset, tokenizer: ClipTokenizer, model_cfg: ModelConfig) -> None:
        super().__init__(cfg, dataset, tokenizer, model_cfg)
        kind = dataset.media_type
        if kind not in ("image", "video"):
            raise DataError(f"dataset {dataset.name!r} has media_type {kind!r}; captioning needs image or video media")
        self.modality = kind
        o = self.opts
        self.vision = vision_options(o, model_cfg, purpose="pair", media=kind, task=cfg.name)
        self.max_len, self.label_smoothing, self.vocab = o.max_len, o.label_smoothing, o.vocab
        self.beam_size, self.max_gen_len, self.length_penalty = o.beam_size, o.max_gen_len, o.length_penalty
        self.meteor, self.spice = o.meteor, o.spice
        self._vocab_ids: Tensor | None = None
        self._label_of: Tensor | None = None
        self._target_set: TargetSet | None = None

    # -- vocabulary ----------------------------------------------------------------------------
    def corpus_token_ids(self) -> list[int]:
        """Sorted ids used by the captions of the training split (as `max_len` cuts them) plus EOT."""
        seen: set[int] = {EOT_ID}
        for sample in self.dataset.samples(self.cfg.split):
            for text in sample.get("texts") or []:
                seen.update(self.tokenizer.encode(text)[: self.max_len - 1])
        return sorted(seen)

    @property
    def vocab_ids(self) -> Tensor:
        """[V] token id of every vocabulary target row."""
        if self._vocab_ids is None:
            ids = list(range(VOCAB_SIZE)) if self.vocab == "full" else self.corpus_token_ids()
            self._vocab_ids = torch.tensor(ids, dtype=torch.long)
            label_of = torch.full((VOCAB_SIZE,), IGNORE, dtype=torch.long)
            label_of[self._vocab_ids] = torch.arange(len(ids))
            self._label_of = label_of
        return self._vocab_ids

    def labels_for(self, words: Tensor, valid: Tensor) -> Tensor:
        """Vocabulary-row labels of the words, IGNORE (-100) on padding and on ids outside the vocabulary."""
        self.vocab_ids  # noqa: B018 - builds the map
        assert self._label_of is not None
        labels = self._label_of[words.clamp(0, VOCAB_SIZE - 1)]
        return torch.where(valid, labels, torch.full_like(labels, IGNORE))

    def target_set(self) -> TargetSet:
        if self._target_set is None:
            self._target_set = vocab_target_set(None if self.vocab == "full" else self.vocab_ids.tolist())
        return self._target_set

    # -- data ----------------------------------------------------------------------------------
    def load(self, sample: dict, *, train: bool, rng: np.random.Generator) -> dict:
        texts = sample_texts(sample, str(self.dataset.root))
        pixels = load_visual(self.dataset, sample, self.vision, train=train, rng=rng)
        if pixels.dim() == 5:  # eval clip with one view: [1, F, 3, H, W]
            pixels = pixels[0]
        item = {"id": str(sample["id"]), "pixels": pixels, "references": list(texts)}
        if train:
            item["caption"] = texts[int(rng.integers(len(texts)))]
        return item

    def collate(self, items: list[dict], *, train: bool, rng: np.random.Generator) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "ids": [it["id"] for it in items],
            "pixels": stack_pixels(items),
            "references": [it["references"] for it in items],
        }
        if train:
            words, valid = self.tokenizer.encode_batch([it["caption"] for it in items], self.max_len)
            batch["words"], batch["word_valid"] = words, valid
            batch["labels"] = self.labels_for(words, valid)
        return batch

    # -- model ---------------------------------------------------------------------------------
    def query_features(self, model: UniPerceiver, pixels: Tensor, words: Tensor, valid: Tensor) -> Tensor:
        """Teacher-forced query features [B, T, D] (query i reads the prediction of word i)."""
        dev = model.device
        visual = VisualSegment(pixels.to(dev))
        text, text_valid, pos = caption_batch(words, valid)
        t = words.shape[1]
        context = 1 + visual.num_tokens(model.cfg.patch_size)
        mask = caption_mask(context, t, device=dev)
        h, _ = model.hidden([visual, TextSegment(text.to(dev), text_valid.to(dev), pos.to(dev))], attn_mask=mask)
        read = (context + t + torch.arange(t, device=dev)).unsqueeze(0).expand(h.shape[0], -1)
        return model.read_out(h, read)

    def loss(self, model: UniPerceiver, batch: dict[str, Any], targets: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        if targets is None:
            raise ConfigError(f"task {self.cfg.name!r}: captioning needs the encoded vocabulary targets")
        if targets.shape[0] != self.vocab_ids.shape[0]:
            raise ConfigError(f"task {self.cfg.name!r}: {targets.shape[0]} vocabulary features for a "
                              f"{self.vocab_ids.shape[0]}-entry vocabulary (vocab={self.vocab!r})")
        feats = self.query_features(model, batch["pixels"], batch["words"], batch["word_valid"])
        labels = batch["labels"].to(feats.device)
        keep = labels != IGNORE
        if not bool(keep.any()):
            raise DataError(f"task {self.cfg.name!r}: a training batch has no word inside the vocabulary")
        logits = model.logits(feats[keep], targets.to(feats.device), self.scale).float()
        loss = F.cross_entropy(logits, labels[keep], label_smoothing=self.label_smoothing)
        with torch.no_grad():
            acc = (logits.argmax(-1) == labels[keep]).float().mean().item() * 100.0
        return loss, {"acc": acc, "tokens": float(keep.sum().item())}

    def generate(self, model: UniPerceiver, pixels: Tensor, targets: Tensor) -> list[list[int]]:
        """Beam-search token ids (without the EOT) for a batch of pixels."""
        return beam_search(model, [VisualSegment(pixels.to(model.device))], targets, self.vocab_ids,
                           beam_size=self.beam_size, max_len=self.max_gen_len,
                           length_penalty=self.length_penalty, eos_id=EOT_ID, scale=self.scale)

    def evaluate_batch(self, model: UniPerceiver, batch: dict[str, Any], targets: Tensor | None) -> list[dict]:
        if targets is None:
            raise ConfigError(f"task {self.cfg.name!r}: captioning needs the encoded vocabulary targets")
        tokens = self.generate(model, batch["pixels"], targets)
        return [
            {"id": sid, "caption": self.tokenizer.decode(toks), "references": refs}
            for sid, toks, refs in zip(batch["ids"], tokens, batch["references"])
        ]

    def compute_metrics(self, predictions: list[dict]) -> dict[str, float]:
        if not predictions:
            raise DataError(f"task {self.cfg.name!r}: no predictions to score")
        preds = {p["id"]: p["caption"] for p in predictions}
        refs = {p["id"]: list(p["references"]) for p in predictions}
        scores = caption_scores(preds, refs, spice=self.spice, meteor=self.meteor)
        keys = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
        return {k: 100.0 * float(scores[k]) for k in keys if scores.get(k) is not None}
