"""GLUE as cloze prompts ("glue", logit scale "downstream" unless option `scale` says otherwise).

A sentence (pair) becomes one text sequence with a `<|spe|>` slot; the encoder output at that slot
(fused position 1 + its index, after the SPE prefix) is scored against a few encoded class words
("word <|endoftext|>"). Prompts, read position and truncation follow the reference
(fundamentalvision/Uni-Perceiver `uniperceiver/datasets/task_dataset/GLUE.py`):

| task  | text (before tokenisation)                                    | words                 |
|-------|---------------------------------------------------------------|-----------------------|
| SST-2 | `<s>  <|endoftext|> It is <|spe|>.   <|endoftext|>`           | bad, wonderful        |
| CoLA  | `<s> This is <|spe|>. <|endoftext|>`                          | incorrect, correct    |
| RTE   | `<s1>` (final "." dropped) ` ? <|endoftext|> it is <|spe|> , <s2> <|endoftext|>` | no, yes |
| MRPC  | `<s1>` (final "." dropped) ` . <|spe|> , <s2> <|endoftext|>`  | no, yes               |
| QQP   | `<s1>` (final "." dropped) ` <|endoftext|> <|spe|> , <s2> <|endoftext|>` | no, yes    |
| QNLI  | `<s1>` (final "." dropped) ` <|endoftext|> it is <|spe|> , <s2> <|endoftext|>` | no, yes |
| MNLI  | `<s1> <|spe|> , <s2> <|endoftext|>`                           | no, maybe, yes        |

Single sentences longer than `max_len` (256) keep their first `max_len - 4` ids and the last four
("is <|spe|> . <|endoftext|>"). Pairs: the second part (`<|spe|> , <s2> <|endoftext|>`) is cut to
max_len // 2 (keeping its last id), the first part to what remains (keeping its last id).
Not in the reference, and chosen here (documented deviations):
- WNLI (entailment, like RTE) uses the RTE prompt; MNLI mismatched uses the MNLI prompt.
- STS-B (a 0-5 similarity score, a regression) uses the MRPC prompt with {no, yes}; training uses
  the soft target [1 - s/5, s/5], the prediction is 5 x p(yes); metrics Pearson / Spearman.
- QNLI cuts its second part to max_len - len(first part) as the reference does, but never below
  max_len // 2 (the reference would produce an empty or negative budget for very long questions).
Labels are the dataset's class indices, in the order of the words (the GLUE preparer and the
mini-sentiment preparer write them in that order). The reference fine-tunes GLUE with label
smoothing 0.1 and the `text_mlm` temperature: the catalog sets both as options.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from uniperceiver.errors import ConfigError, DataError
from uniperceiver.metrics import glue_metrics
from uniperceiver.modeling.model import TextSegment, UniPerceiver
from uniperceiver.tasks.base import TargetSet, Task, text_target_set
from uniperceiver.tasks.family_options import CLOZE_WORDS, GlueOptions, glue_key
from uniperceiver.tokenizers.text import PAD_ID, SPE_ID, ClipTokenizer

PERIOD_ID = 269  # ".</w>": the reference drops it from the end of the first sentence of pairs

def _single(tok: ClipTokenizer, text: str, suffix: str, max_len: int) -> tuple[list[int], int]:
    ids = tok.encode(text + suffix)
    if len(ids) > max_len:
        ids = ids[: max_len - 4] + ids[-4:]
    return ids, len(ids) - 3


def _strip_period(ids: list[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] == PERIOD_ID else ids


def _pair(tok: ClipTokenizer, first: list[int], text_b: str, max_len: int, second_budget: int | None = None) -> tuple[list[int], int]:
    second = tok.encode("  <|spe|> , ") + tok.encode(text_b + " <|endoftext|> ")
    budget = max_len // 2 if second_budget is None else max(second_budget, max_len // 2)
    if len(second) > budget:
        second = second[: budget - 1] + [second[-1]]
    room = max_len - len(second)
    if len(first) > room:
        first = first[: room - 1] + [first[-1]]
    return first + second, len(first)


def build_prompt(tok: ClipTokenizer, key: str, text: str, text_b: str | None = None, max_len: int = 256) -> tuple[list[int], int]:
    """The reference cloze sequence of one sample -> (token ids, index of its <|spe|> in them)."""
    key = glue_key(key)
    if key in ("sst2", "cola"):
        suffix = "  <|endoftext|> It is <|spe|>.   <|endoftext|>" if key == "sst2" else " This is <|spe|>. <|endoftext|>"
        return _single(tok, text, suffix, max_len)
    if text_b is None:
        raise DataError(f"GLUE {key}: sample has no 'text_b' (a sentence-pair task needs two sentences)")
    enc = tok.encode
    if key in ("rte", "wnli"):
        first = _strip_period(enc(text)) + enc(" ? <|endoftext|> it is  ")
    elif key in ("mrpc", "stsb"):
        first = _strip_period(enc(text)) + enc(" . ")
    elif key == "qqp":
        first = _strip_period(enc(text)) + enc(" <|endoftext|> ")
    elif key == "qnli":
        first = _strip_period(enc(text)) + enc("  <|endoftext|> it is ")
        return _pair(tok, first, text_b, max_len, second_budget=max_len - len(first))
    else:  # mnli
        first = enc(text)
    return _pair(tok, first, text_b, max_len)


class GlueCloze(Task):
    """GLUE (and GLUE-like text classification) as a cloze read at `<|spe|>`."""

    family = "glue"
    Options = GlueOptions
    opts: GlueOptions
    scale = "downstream"
    modality = "text"

    def __init__(self, cfg, dataset, tokenizer, model_cfg) -> None:
        super().__init__(cfg, dataset, tokenizer, model_cfg)
        o = self.opts
        self.key = glue_key(o.glue_task or dataset.name)
        self.words: list[str] = list(o.words or CLOZE_WORDS[self.key])
        self.regression = self.key == "stsb"
        classes = dataset.classes
        if not self.regression and classes is not None and len(classes) != len(self.words):
            raise ConfigError(
                f"task {cfg.name!r}: dataset {dataset.name!r} has {len(classes)} classes {classes} but the cloze "
                f"has {len(self.words)} words {self.words}; set options.words to one word per class"
            )
        self.max_len, self.label_smoothing = o.max_len, o.label_smoothing
        self.scale = o.scale or type(self).scale
        self._targets: TargetSet | None = None

    def target_set(self) -> TargetSet:
        if self._targets is None:
            self._targets = text_target_set(f"glue-{self.key}-words", self.words, self.tokenizer, max_len=16)
        return self._targets

    def load(self, sample: dict, *, train: bool, rng: np.random.Generator) -> dict:
        if "text" not in sample:
            raise DataError(f"dataset {self.dataset.name!r} sample {sample.get('id')!r}: no 'text'")
        ids, index = build_prompt(self.tokenizer, self.key, str(sample["text"]),
                                  None if sample.get("text_b") is None else str(sample["text_b"]), self.max_len)
        if ids[index] != SPE_ID:  # cannot happen with the prompts above; guards future edits
            raise DataError(f"GLUE {self.key}: the read position {index} is not <|spe|> in sample {sample.get('id')!r}")
        label = sample.get("label")
        return {"id": str(sample["id"]), "ids": torch.tensor(ids, dtype=torch.long), "spe_index": index,
                "label": None if label is None else (float(label) if self.regression else int(label))}

    def collate(self, items: list[dict], *, train: bool, rng: np.random.Generator) -> dict[str, Any]:
        if not items:
            raise ConfigError(f"task {self.cfg.name!r}: cannot collate an empty batch")
        width = max(len(it["ids"]) for it in items)
        ids = torch.full((len(items), width), PAD_ID, dtype=torch.long)
        valid = torch.zeros((len(items), width), dtype=torch.bool)
        for i, it in enumerate(items):
            ids[i, : len(it["ids"])] = it["ids"]
            valid[i, : len(it["ids"])] = True
        read = torch.tensor([1 + it["spe_index"] for it in items], dtype=torch.long)
        has_label = torch.tensor([it["label"] is not None for it in items])
        dtype = torch.float if self.regression else torch.long
        labels = torch.tensor([(it["label"] if it["label"] is not None else -100) for it in items], dtype=dtype)
        return {"ids": ids, "valid": valid, "read": read, "labels": labels, "has_label": has_label,
                "sample_ids": [it["id"] for it in items]}

    def _logits(self, model: UniPerceiver, batch: dict[str, Any], targets: Tensor) -> Tensor:
        feats = model.encode([TextSegment(batch["ids"], batch["valid"])], read=batch["read"])
        return model.logits(feats, targets, self.scale)

    def loss(self, model: UniPerceiver, batch: dict[str, Any], targets: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        if targets is None:
            raise ConfigError(f"task {self.cfg.name!r}: GLUE needs the encoded class words")
        logits = self._logits(model, batch, targets).float()
        keep = batch["has_label"].to(logits.device)
        if not bool(keep.any()):
            raise DataError(f"task {self.cfg.name!r}: a training batch without labels (is the split a test split?)")
        labels = batch["labels"].to(logits.device)[keep]
        logits = logits[keep]
        if self.regression:
            y = (labels / 5.0).clamp(0.0, 1.0)
            soft = torch.stack([1.0 - y, y], dim=-1)
            loss = -(soft * logits.log_softmax(-1)).sum(-1).mean()
            return loss, {"mae": float((logits.softmax(-1)[:, 1] * 5.0 - labels).abs().mean().item())}
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return loss, {"accuracy": float((logits.argmax(-1) == labels).float().mean().item() * 100.0)}

    @torch.no_grad()
    def evaluate_batch(self, model: UniPerceiver, batch: dict[str, Any], targets: Tensor | None) -> list[dict]:
        if targets is None:
            raise ConfigError(f"task {self.cfg.name!r}: GLUE needs the encoded class words")
        logits = self._logits(model, batch, targets).float()
        out = []
        for i, sid in enumerate(batch["sample_ids"]):
            label = batch["labels"][i].item() if bool(batch["has_label"][i]) else None
            if self.regression:
                pred: float | int = float(logits[i].softmax(-1)[1].item() * 5.0)
                out.append({"id": sid, "pred": pred, "label": label})
            else:
                k = int(logits[i].argmax().item())
                out.append({"id": sid, "pred": k, "word": self.words[k], "label": None if label is None else int(label)})
        return out

    def compute_metrics(self, predictions: list[dict]) -> dict[str, float]:
        labelled = [p for p in predictions if p.get("label") is not None]
        if not labelled:  # a test split: predictions only
            return {"num_samples": float(len(predictions))}
        metrics = glue_metrics(self.key, [p["pred"] for p in labelled], [p["label"] for p in labelled])
        metrics["num_samples"] = float(len(labelled))
        return metrics

