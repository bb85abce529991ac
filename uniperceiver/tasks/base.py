"""The one small interface between task families and the trainer / evaluator.

A task family turns prepared samples into model inputs, target sets, a loss and predictions.
The trainer knows tasks only through `Task`; tasks know nothing of the trainer.

Life of a training step (see uniperceiver/engine):
    items  = [task.load(sample, train=True, rng=...) for sample in chosen samples]   # may raise MediaError
    batch  = task.collate(items, train=True, rng=...)
    ts     = task.target_set()                      # token ids of the shared candidates, or None
    feats  = encode_targets(model, ts)             # WITH gradients every training step (reference)
    loss, stats = task.loss(model, batch, feats)
Evaluation:
    preds  = task.evaluate_batch(model, batch, feats)   # list of per-sample JSON-able dicts (+ tensors allowed)
    metrics = task.compute_metrics(preds)
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from uniperceiver.data.format import PreparedDataset
from uniperceiver.errors import ConfigError
from uniperceiver.modeling.model_config import ModelConfig
from uniperceiver.modeling.model import UniPerceiver
from uniperceiver.tokenizers.text import EOT_ID, ClipTokenizer


@dataclass
class TaskConfig:
    """One entry of a recipe's `tasks:` list (also what the catalog's defaults fill in)."""

    name: str
    family: str
    dataset: str
    split: str = "train"
    eval_split: str = "val"
    batch_size: int = 8
    sample_weight: float = 1.0
    loss_weight: float = 1.0
    #: Family-specific options (image_size, frames, stride, max_len, label_smoothing, mixup, cutmix,
    #: vocab ("full" | "corpus"), template, beam_size, length_penalty, max_gen_len, ...).
    options: dict[str, Any] = field(default_factory=dict)

    def option(self, key: str, default: Any) -> Any:
        return self.options.get(key, default)


@dataclass
class TargetSet:
    """The shared candidates of a task as token sequences: each row is `text <|endoftext|>`.

    `ids` [N, L] (padded with 0), `valid` [N, L]; `labels` the human-readable names;
    `key` a stable hash of the content (for the evaluation cache).
    """

    name: str
    ids: Tensor
    valid: Tensor
    labels: list[str]
    key: str = ""

    def __post_init__(self) -> None:
        if not self.key:
            h = hashlib.sha256(self.name.encode())
            h.update(self.ids.numpy().tobytes())
            h.update(self.valid.numpy().tobytes())
            self.key = h.hexdigest()[:16]

    def __len__(self) -> int:
        return self.ids.shape[0]


def text_target_set(name: str, texts: list[str], tokenizer: ClipTokenizer, max_len: int = 30) -> TargetSet:
    """Class names / answers as targets: each is `text <|endoftext|>` (reference)."""
    if not texts:
        raise ConfigError(f"target set {name!r} is empty: at least one candidate is needed")
    ids, valid = tokenizer.encode_batch(texts, max_len)
    return TargetSet(name, ids, valid, list(texts))


def vocab_target_set(token_ids: list[int] | None = None, vocab_size: int = 49411) -> TargetSet:
    """The "word classifier": each vocabulary entry v is `[v, <|endoftext|>]` through the encoder.

    token_ids None -> all 49,411 ids (reference); a list -> that subset (a documented deviation that
    makes small models and CPU demos affordable; labels then index into the subset).
    """
    ids_list = list(range(vocab_size)) if token_ids is None else sorted(set(token_ids))
    ids = torch.tensor([[v, EOT_ID] for v in ids_list], dtype=torch.long)
    return TargetSet("vocab" if token_ids is None else "vocab-subset", ids, torch.ones_like(ids, dtype=torch.bool), [str(v) for v in ids_list])


def encode_targets(model: UniPerceiver, targets: TargetSet, chunk: int = 4096) -> Tensor:
    """Encode every candidate (read at its SPE prefix) in chunks: [N, D].

    Gradients flow when called under grad mode (training recomputes targets every step).
    """
    device = model.device
    outs = []
    for start in range(0, len(targets), chunk):
        ids = targets.ids[start : start + chunk].to(device)
        valid = targets.valid[start : start + chunk].to(device)
        # Trim padding columns shared by the whole chunk.
        keep = int(valid.sum(1).max())
        outs.append(model.encode_text(ids[:, :keep], valid[:, :keep]))
    return torch.cat(outs)


class Task(ABC):
    """A task family bound to one dataset and its options."""

    family: ClassVar[str]
    #: Name of the logit scale (temperature) the family uses.
    scale: ClassVar[str]
    #: Modality of the inputs: "image", "video" or "text".
    modality: ClassVar[str]

    def __init__(
        self, cfg: TaskConfig, dataset: PreparedDataset, tokenizer: ClipTokenizer, model_cfg: ModelConfig
    ) -> None:
        self.cfg = cfg
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg

    # -- data ------------------------------------------------------------------------------------
    def examples(self, split: str) -> list[dict]:
        """The manifest samples of a split (subclasses may expand, e.g. one row per caption)."""
        return self.dataset.load_split(split)

    @abstractmethod
    def load(self, sample: dict, *, train: bool, rng: np.random.Generator) -> dict:
        """Decode and tokenize one sample. Raise `MediaError` for unreadable media (counted by callers)."""

    @abstractmethod
    def collate(self, items: list[dict], *, train: bool, rng: np.random.Generator) -> dict[str, Any]:
        """Stack loaded samples into a batch (mixup / cutmix happen here in training)."""

    def target_set(self) -> TargetSet | None:
        """The shared candidates (class names, answers, vocabulary), or None (retrieval: in-batch)."""
        return None

    # -- training ----------------------------------------------------------------------------------
    @abstractmethod
    def loss(self, model: UniPerceiver, batch: dict[str, Any], targets: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        """Forward the batch and return (scalar loss, extra stats such as accuracy)."""

    # -- evaluation ----------------------------------------------------------------------------------
    @abstractmethod
    def evaluate_batch(self, model: UniPerceiver, batch: dict[str, Any], targets: Tensor | None) -> list[dict]:
        """Per-sample predictions (JSON-able values; tensors allowed for features)."""

    @abstractmethod
    def compute_metrics(self, predictions: list[dict]) -> dict[str, float]:
        """The task's metric(s) from the predictions of a whole split."""
