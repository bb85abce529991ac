"""The one small interface between task families and the trainer / evaluator.

A task family turns prepared samples into model inputs, target sets, a loss and predictions.
The trainer and the evaluation harness know tasks only through `Task`; tasks know nothing of the
trainer. Every hook they call is declared here with a default, so nobody probes a task with
`getattr` or compares family names.

Life of a training step (uniperceiver/engine):
    items  = [task.load(sample, train=True, rng=...) for sample in chosen samples]   # may raise MediaError
    batch  = task.collate(items, train=True, rng=...)
    ts     = task.training_target_set(rng) if task.target_set_varies else task.target_set()  (cached)
    feats  = task.encode_target_set(model, ts)     # WITH gradients every training step (reference);
                                                   # texts may go through the engine's sharded path
    loss, stats = task.loss(model, batch, feats)
Evaluation (uniperceiver/evaluation):
    feats  = task.encode_target_set(model, task.target_set())   # cached by `TargetSet.key`
    preds  = task.evaluate_batch(model, batch, feats)   # list of per-sample JSON-able dicts (+ tensors allowed)
    metrics = task.compute_metrics(preds)
    record.update(task.evaluation_extras())

Hooks beyond the abstract methods (name, default, caller):
- `target_set()` -> None: the shared candidates (class names, answers, vocabulary); None for
  in-batch targets (retrieval). Called by the engine (engine/targets.py) and the harness.
- `target_set_varies` -> False: True when training draws a new set per batch (ImageNet-21k: one
  synonym per class). Callers cache `target_set()` unless it is True. Read by engine/targets.py.
- `training_target_set(rng)` -> `target_set()`: the candidates of one training batch, drawn from
  `rng` (the same generator on every rank). Called by engine/targets.py when `target_set_varies`.
- `targets_are_texts` -> True: the candidates are plain text token ids that the engine may encode
  on its shared, sharded text path (`encode_targets`); False for example-image targets, which
  must go through `encode_target_set`. Read by engine/targets.py and the harness.
- `encode_target_set(model, targets)` -> `encode_targets(model, targets)`: [N, D] features of a
  target set (example-image targets: the renormalised mean of their image features). Called by
  engine/targets.py and the harness.
- `evaluation_extras()` -> {}: extra facts for the evaluation record (the custom task's
  `candidate_skipped` counts). Called by the evaluation commands.
- `eval_batch_size` -> option `eval_batch_size`, else `cfg.batch_size`: the batch size of
  evaluation. Read by the harness.
- `set_feature_gathering(enabled)` -> ignored: the run's decision (train.gather_features, or the
  reference rule: gather only when one task is trained alone on several ranks) for tasks whose
  loss can use features of every rank (retrieval, unless its own option says otherwise). Called
  once per task by engine/run_setup.py.

Options: each family declares `Options`, a frozen dataclass of its typed options
(uniperceiver/tasks/family_options.py: torch-free, so recipes are checked without the model).
`TaskConfig` (uniperceiver/tasks/options.py, re-exported here) holds them as YAML data;
`TaskConfig.options` is converted once, in the constructor, into `self.opts`.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import Tensor

from uniperceiver.data.format import PreparedDataset
from uniperceiver.errors import ConfigError
from uniperceiver.modeling.model import UniPerceiver
from uniperceiver.modeling.model_config import ModelConfig
from uniperceiver.tasks.options import TaskConfig, TaskOptions
from uniperceiver.tokenizers.text import EOT_ID, ClipTokenizer


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
    #: The family's typed options (`self.opts` holds this task's values).
    Options: ClassVar[type[TaskOptions]] = TaskOptions
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
        self.opts = cfg.typed_options(type(self).Options, model_cfg)

    # -- data ------------------------------------------------------------------------------------
    def examples(self, split: str) -> Sequence[dict]:
        """The manifest samples of a split by index, memory-mapped (`PreparedDataset.rows`): no copy
        per rank or loader worker. Subclasses may expand (one row per caption) or return a list."""
        return self.dataset.rows(split)

    @abstractmethod
    def load(self, sample: dict, *, train: bool, rng: np.random.Generator) -> dict:
        """Decode and tokenize one sample. Raise `MediaError` for unreadable media (counted by callers)."""

    @abstractmethod
    def collate(self, items: list[dict], *, train: bool, rng: np.random.Generator) -> dict[str, Any]:
        """Stack loaded samples into a batch (mixup / cutmix happen here in training)."""

    # -- targets (see the module docstring for who calls each hook) ------------------------------
    def target_set(self) -> TargetSet | None:
        """The shared candidates (class names, answers, vocabulary), or None (retrieval: in-batch)."""
        return None

    @property
    def target_set_varies(self) -> bool:
        """True when training draws a new target set per batch (`training_target_set`); callers
        cache `target_set()` otherwise."""
        return False

    def training_target_set(self, rng: np.random.Generator) -> TargetSet | None:
        """The candidates of one training batch, drawn from `rng` (equal on every rank).

        Must return `target_set()` whenever `target_set_varies` is False.
        """
        return self.target_set()

    @property
    def targets_are_texts(self) -> bool:
        """True when the candidates are plain text token ids, which the engine may encode itself
        (sharded across ranks); False when only `encode_target_set` knows how (example images)."""
        return True

    def encode_target_set(self, model: UniPerceiver, targets: TargetSet) -> Tensor:
        """[N, D] features of `targets` (with gradients under grad mode). Text candidates: the
        shared `encode_targets`; a family with other candidates overrides this and says so with
        `targets_are_texts = False`."""
        return encode_targets(model, targets)

    # -- run set-up and evaluation facts -------------------------------------------------------
    def set_feature_gathering(self, enabled: bool) -> None:
        """The run's cross-rank feature-gathering decision; families whose loss cannot use it ignore it."""

    @property
    def eval_batch_size(self) -> int:
        """Batch size of evaluation: option `eval_batch_size` when set, else the training batch size."""
        return int(self.opts.eval_batch_size or self.cfg.batch_size)

    def evaluation_extras(self) -> dict[str, Any]:
        """Extra JSON-able facts for the evaluation record (e.g. skipped candidate files)."""
        return {}

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
