"""Visual question answering ("vqa", logit scale "downstream"): read at the `<|spe|>` inside the question.

Layout (reference `VQADataset` with DO_AS_GEN, reference-conventions.md "Task layouts"):
- the question's BPE ids are cut to `max_len - 2` (21 for the reference max_len 23), then
  `<|spe|> <|endoftext|>` is appended;
- the sequence is `[SPE] + image + question` with no attention mask (padding only);
- the output at the question's `<|spe|>` (fused position 1 + image tokens + its index in the
  question) is scored against every answer of the dataset's answer list, each encoded as
  "answer <|endoftext|>" (targets.answers of meta.json; 3,129 for VQAv2).
Training: one answer per question, drawn with probability proportional to its soft score
(manifest "answer_scores", restricted to the answer list); cross-entropy. A question none of whose
answers is in the list is ignored by the loss (the reference trains it towards answer 0 instead:
a deliberate deviation). Images: the reference train transform (bicubic resize of the short side
to the image size, random crop, then a horizontal flip with probability 0.5); option
`train_transform: random_resized` uses `vision.image_train_transform` instead. A flip swaps the
words "left" and "right" in the question and in the answers. (The reference swaps the ids of the
word-INTERNAL pieces "left"/"right", which whole words never use, so its questions are in effect
never swapped; its answers are. Here the whole words `left</w>`/`right</w>` are swapped, as the
paper describes.)
Option `fixed_temperature` (the reference fine-tunes with tau 0.03, recipes/finetune/vqav2.yaml):
logits are cosine / tau instead of the learnable `downstream` scale.
Evaluation: bicubic resize of the short side + center crop; the argmax answer is scored by the
official VQA accuracy (`evaluation.vqa_eval.vqa_score`) against the 10 raw human answers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from uniperceiver.data.media import load_image
from uniperceiver.errors import ConfigError, DataError
from uniperceiver.metrics.vqa import vqa_score
from uniperceiver.modeling.model import TextSegment, UniPerceiver, VisualSegment
from uniperceiver.tasks.base import TargetSet, Task, text_target_set
from uniperceiver.tasks.family_options import VQAOptions
from uniperceiver.tokenizers.text import EOT_ID, PAD_ID, SPE_ID
from uniperceiver.tokenizers.vision import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    image_eval_transform,
    image_train_transform,
    pil_to_tensor,
    short_side_size,
)

IGNORE = -100
_SWAP = {"left": "right", "right": "left"}


def torch_generator(rng: np.random.Generator) -> torch.Generator:
    """A torch generator seeded from a numpy one (the vision transforms take torch generators)."""
    return torch.Generator().manual_seed(int(rng.integers(0, 2**62)))


def reference_train_transform(img: Image.Image, size: int, rng: torch.Generator, hflip: bool = True) -> tuple[Tensor, bool]:
    """Reference VQA training view: bicubic short-side resize to `size`, random `size` crop, flip p=0.5."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = short_side_size(img.width, img.height, size)
    img = img.resize((w, h), Image.BICUBIC)
    top = int(torch.randint(0, h - size + 1, (1,), generator=rng).item())
    left = int(torch.randint(0, w - size + 1, (1,), generator=rng).item())
    img = img.crop((left, top, left + size, top + size))
    flipped = bool(hflip and torch.rand(1, generator=rng).item() < 0.5)
    if flipped:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    x = pil_to_tensor(img)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std, flipped


def sample_answer(scores: dict[str, float], answer_index: dict[str, int], rng: np.random.Generator) -> int:
    """One answer index drawn proportionally to its soft score among answers in the list; IGNORE if none."""
    cands = [(answer_index[a], float(s)) for a, s in sorted(scores.items()) if a in answer_index and float(s) > 0]
    if not cands:
        return IGNORE
    p = np.array([s for _, s in cands], dtype=np.float64)
    k = int(rng.choice(len(cands), p=p / p.sum()))
    return cands[k][0]


class VQA(Task):
    """Answer-list VQA (VQAv2 and datasets in its prepared layout)."""

    family = "vqa"
    Options = VQAOptions
    opts: VQAOptions
    scale = "downstream"
    modality = "image"

    def __init__(self, cfg, dataset, tokenizer, model_cfg) -> None:
        super().__init__(cfg, dataset, tokenizer, model_cfg)
        answers = dataset.answers
        if not answers:
            raise DataError(f"dataset {dataset.name!r} has no answer list (meta.json targets.answers); "
                            f"run `upctl prepare {dataset.name}` again")
        self.answers: list[str] = list(answers)
        self.answer_index = {a: i for i, a in enumerate(self.answers)}
        o = self.opts
        self.max_len, self.answer_max_len = o.max_len, o.answer_max_len
        self.image_size = o.image_size or model_cfg.image_size
        self.train_transform, self.hflip, self.label_smoothing = o.train_transform, o.hflip, o.label_smoothing
        self.scale = o.scale or type(self).scale
        # The reference fine-tunes VQA with a fixed temperature (tau 0.03): logits = cosine / tau,
        # instead of the learnable, clamped `downstream` scale.
        self.fixed_temperature: float | None = o.fixed_temperature
        self.left_id = tokenizer.token_to_id("left</w>")
        self.right_id = tokenizer.token_to_id("right</w>")
        self._targets: TargetSet | None = None

    # -- targets ------------------------------------------------------------------------------------
    def target_set(self) -> TargetSet:
        if self._targets is None:
            self._targets = text_target_set(f"{self.dataset.name}-answers", self.answers, self.tokenizer,
                                            max_len=self.answer_max_len)
        return self._targets

    # -- data ------------------------------------------------------------------------------------
    def question_ids(self, question: str, flipped: bool = False) -> tuple[list[int], int]:
        """Question ids cut to max_len - 2, then <|spe|> <|endoftext|> -> (ids, index of that <|spe|>)."""
        ids = self.tokenizer.encode(question)[: self.max_len - 2] + [SPE_ID, EOT_ID]
        if flipped:
            ids = [self.right_id if t == self.left_id else self.left_id if t == self.right_id else t for t in ids]
        return ids, len(ids) - 2

    def load(self, sample: dict, *, train: bool, rng: np.random.Generator) -> dict:
        if "question" not in sample:
            raise DataError(f"dataset {self.dataset.name!r} sample {sample.get('id')!r}: no 'question'")
        img = load_image(self.dataset.media_path(sample))
        flipped = False
        if train:
            gen = torch_generator(rng)
            if self.train_transform == "reference":
                pixels, flipped = reference_train_transform(img, self.image_size, gen, self.hflip)
            else:
                pixels, flipped = image_train_transform(img, self.image_size, rng=gen, hflip=self.hflip)
        else:
            pixels = image_eval_transform(img, self.image_size)
        ids, spe_index = self.question_ids(str(sample["question"]), flipped)
        target = IGNORE
        scores = sample.get("answer_scores") or {}
        if train and scores:
            if flipped:
                scores = {_SWAP.get(a, a): s for a, s in scores.items()}
            target = sample_answer(scores, self.answer_index, rng)
        return {
            "id": str(sample["id"]), "question_id": sample.get("question_id", sample["id"]),
            "pixels": pixels, "ids": torch.tensor(ids, dtype=torch.long), "spe_index": spe_index,
            "target": target, "flipped": flipped, "answers": sample.get("answers"),
            "answer_type": sample.get("answer_type"),
        }

    def collate(self, items: list[dict], *, train: bool, rng: np.random.Generator) -> dict[str, Any]:
        if not items:
            raise ConfigError(f"task {self.cfg.name!r}: cannot collate an empty batch")
        pixels = torch.stack([it["pixels"] for it in items])
        width = max(len(it["ids"]) for it in items)
        ids = torch.full((len(items), width), PAD_ID, dtype=torch.long)
        valid = torch.zeros((len(items), width), dtype=torch.bool)
        for i, it in enumerate(items):
            ids[i, : len(it["ids"])] = it["ids"]
            valid[i, : len(it["ids"])] = True
        visual = VisualSegment(pixels).num_tokens(self.model_cfg.patch_size)
        read = torch.tensor([1 + visual + it["spe_index"] for it in items], dtype=torch.long)
        return {
            "pixels": pixels, "ids": ids, "valid": valid, "read": read,
            "targets": torch.tensor([it["target"] for it in items], dtype=torch.long),
            "question_ids": [it["question_id"] for it in items], "answers": [it["answers"] for it in items],
            "answer_types": [it["answer_type"] for it in items], "sample_ids": [it["id"] for it in items],
        }

    # -- training / evaluation -------------------------------------------------------------------------
    def _logits(self, model: UniPerceiver, batch: dict[str, Any], targets: Tensor) -> Tensor:
        feats = model.encode([VisualSegment(batch["pixels"]), TextSegment(batch["ids"], batch["valid"])], read=batch["read"])
        if self.fixed_temperature is not None:
            return model.logits(feats, targets, None) / self.fixed_temperature
        return model.logits(feats, targets, self.scale)

    def loss(self, model: UniPerceiver, batch: dict[str, Any], targets: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        if targets is None:
            raise ConfigError(f"task {self.cfg.name!r}: VQA needs the encoded answers")
        logits = self._logits(model, batch, targets).float()
        tgt = batch["targets"].to(logits.device)
        keep = tgt.ne(IGNORE)
        if not bool(keep.any()):
            return logits.sum() * 0.0, {"accuracy": 0.0, "answered": 0.0}
        loss = F.cross_entropy(logits[keep], tgt[keep], label_smoothing=self.label_smoothing)
        acc = float((logits[keep].argmax(-1) == tgt[keep]).float().mean().item() * 100.0)
        return loss, {"accuracy": acc, "answered": float(keep.sum().item())}

    @torch.no_grad()
    def evaluate_batch(self, model: UniPerceiver, batch: dict[str, Any], targets: Tensor | None) -> list[dict]:
        if targets is None:
            raise ConfigError(f"task {self.cfg.name!r}: VQA needs the encoded answers")
        best = self._logits(model, batch, targets).argmax(-1).tolist()
        return [{"question_id": q, "answer": self.answers[k], "gt": a, "answer_type": t}
                for q, k, a, t in zip(batch["question_ids"], best, batch["answers"], batch["answer_types"])]

    def compute_metrics(self, predictions: list[dict]) -> dict[str, float]:
        scored = [p for p in predictions if p.get("gt")]
        if not scored:  # test-dev / test: answers only, for the evaluation server
            return {"num_questions": float(len(predictions))}
        preds = {p["question_id"]: p["answer"] for p in scored}
        gts = {p["question_id"]: p["gt"] for p in scored}
        types = {p["question_id"]: p["answer_type"] for p in scored} if all(p.get("answer_type") for p in scored) else None
        res = vqa_score(preds, gts, answer_types=types)
        out = {"accuracy": float(res["overall"]), "num_questions": float(res["num_questions"])}
        out.update({f"accuracy_{t}": float(v) for t, v in res["per_answer_type"].items()})
        return out
