"""Masked language modelling ("mlm", logit scale "text_mlm"): whole-word masking scored against the vocabulary.

What the reference does (fundamentalvision/Uni-Perceiver, `GeneralCorpusDataset`), reproduced here:

- Text is basic-tokenised into words (the CLIP split pattern), `<|endoftext|>` is appended to
  every non-empty line, and consecutive lines are packed until the sample holds at least
  `min_words` words (default = `max_len` = 128), wrapping around to the corpus start.
  Every line starts one sample, so windows overlap (as in the reference).
- Whole-word masking: each word independently with probability 15%; a chosen word is 80% of the
  time replaced by `<|spe|>` (49410, the reference mask id) on every sub-token, 10% by random ids
  (one per sub-token, uniform over all 49,411 ids), 10% left unchanged. Labels (the original
  sub-tokens) exist only on the chosen words' sub-tokens; the `<|endoftext|>` words are maskable too.
- Truncation to `max_len` sub-tokens keeps the first `max_len - 1` and the LAST sub-token of the
  packed sequence (`ids[:L-1] + [ids[-1]]`, labels alike), exactly like the reference.
- The sequence is `[SPE] + text`; the model reads the text positions that carry a label (fused
  position = 1 + text index) and scores them against the vocabulary target set (each id v is
  `[SPE, v, <|endoftext|>]` through the encoder). Loss: cross-entropy (no label smoothing).

Vocabulary (option `vocab`): "full" = all 49,411 ids (reference); "corpus" = the ids that occur
in any split of the dataset, plus `<|endoftext|>` (a documented deviation that makes small models
affordable; labels are then indices into that sorted subset, and a label outside it is ignored).

Streamed corpora (bookswiki: manifest lines {"text_file", "lines"}): `examples()` is a lazy
sequence (`CorpusWindows`) over a memory-mapped line index (`data/corpus_index.py`, built once beside
the manifest): window i is read from disk when the loader asks for it, so the trainer samples a
BooksWiki-size corpus with the usual per-epoch permutation and exact resume, in memory that does not
grow with the corpus. `MaskedLM.iter_examples(split, start_line)` streams the same windows in order
(one pass, for tools that read the corpus sequentially). The corpus vocabulary of a streamed corpus is
read once by streaming as well.

Evaluation: masked-token accuracy (percent) with a masking that depends only on the sample id
and option `eval_seed` (default 0), so every evaluation of a split masks the same tokens.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Sequence
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from uniperceiver.data.corpus_index import CorpusIndex
from uniperceiver.data.format import iter_corpus_lines
from uniperceiver.errors import ConfigError
from uniperceiver.modeling.model import TextSegment, UniPerceiver
from uniperceiver.tasks.base import TargetSet, Task, vocab_target_set
from uniperceiver.tasks.family_options import MLMOptions
from uniperceiver.tokenizers.text import EOT_ID, PAD_ID, SPE_ID, VOCAB_SIZE

IGNORE = -100
MASK_ID = SPE_ID  # the reference masks with <|spe|>, not <|mask|>


def whole_word_mask(
    words: list[list[int]], rng: np.random.Generator, mask_prob: float = 0.15, vocab_size: int = VOCAB_SIZE
) -> tuple[list[int], list[int], list[int]]:
    """Mask whole words (reference `random_word_wwm`) -> (input ids, labels (-1 = none), word index per id)."""
    ids: list[int] = []
    labels: list[int] = []
    word_index: list[int] = []
    for w, pieces in enumerate(words):
        p = float(rng.random())
        if p < mask_prob:
            p /= mask_prob
            if p < 0.8:
                ids.extend([MASK_ID] * len(pieces))
            elif p < 0.9:
                ids.extend(int(v) for v in rng.integers(0, vocab_size, size=len(pieces)))
            else:
                ids.extend(pieces)
            labels.extend(pieces)
        else:
            ids.extend(pieces)
            labels.extend([-1] * len(pieces))
        word_index.extend([w] * len(pieces))
    return ids, labels, word_index


def truncate_keep_last(seq: list[int], max_len: int) -> list[int]:
    """The reference truncation: the first max_len - 1 items and the last one."""
    return seq if len(seq) <= max_len else seq[: max_len - 1] + [seq[-1]]


class CorpusWindows(Sequence):
    """The packed MLM windows of a streamed corpus, one per non-blank line, read on access.

    Window i holds line i and the lines after it until it has `min_words` words, wrapping to the
    corpus start (as `MaskedLM.iter_examples` packs them; a line with no word only adds nothing).
    Nothing but the memory-mapped line index is held, so memory does not grow with the corpus.
    """

    def __init__(self, index: CorpusIndex, split: str, count_words, min_words: int) -> None:
        self.index = index
        self.split = split
        self.count_words = count_words
        self.min_words = int(min_words)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        i = int(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"window {i} outside the split's {n:,} windows")
        lines: list[str] = []
        got = 0
        for text in self.index.lines_from(i):
            lines.append(text)
            got += self.count_words(text)
            if got >= self.min_words:
                break
        return {"id": f"{self.split}:{i}", "lines": lines}

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]


def _seed_for(key: str, seed: int) -> np.random.Generator:
    digest = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([int(seed), digest])


class MaskedLM(Task):
    """Whole-word masked language modelling on a text corpus (see the module docstring)."""

    family = "mlm"
    Options = MLMOptions
    opts: MLMOptions
    scale = "text_mlm"
    modality = "text"

    def __init__(self, cfg, dataset, tokenizer, model_cfg) -> None:
        super().__init__(cfg, dataset, tokenizer, model_cfg)
        o = self.opts
        self.max_len, self.mask_prob, self.vocab = o.max_len, o.mask_prob, o.vocab
        self.min_words = o.min_words or o.max_len
        self.eval_seed, self.label_smoothing = o.eval_seed, o.label_smoothing
        self._examples: dict[str, Sequence[dict]] = {}
        self._targets: TargetSet | None = None
        self._lookup: Tensor | None = None  # token id -> index in the target set (-100 outside)

    # -- data ------------------------------------------------------------------------------------
    def streaming(self, split: str) -> bool:
        """True when the split is a streamed corpus (text files), to be read with `iter_examples`."""
        for sample in self.dataset.samples(split):
            return "text_file" in sample
        return False

    def _line_count(self, split: str) -> int:
        return sum(int(s.get("lines", 1)) if "text_file" in s else int("text" in s) for s in self.dataset.samples(split))

    def _words(self, text: str) -> int:
        n = len(self.tokenizer.encode_words(text))
        return n + 1 if n else 0  # + <|endoftext|>

    def examples(self, split: str) -> Sequence[dict]:
        """Packed windows, one starting at every non-empty line: {"id": "<split>:<line>", "lines": [...]}.

        A streamed corpus gives a lazy `CorpusWindows` (windows read from disk on access); inline
        "text" samples give a list.
        """
        if split not in self._examples:
            if self.streaming(split):
                self._examples[split] = CorpusWindows(CorpusIndex.open(self.dataset, split), split, self._words,
                                                      self.min_words)
            else:
                self._examples[split] = list(self.iter_examples(split))
        return self._examples[split]

    def iter_examples(self, split: str, start_line: int = 0) -> Iterator[dict]:
        """Stream the packed windows of a split (manifest "text" lines or text files) from line `start_line`.

        A window starts at every non-empty line and takes the following lines until it holds
        `min_words` words; the last windows wrap around to the first lines read (kept aside), as
        the reference wraps to the corpus start. `start_line` counts lines as
        `format.iter_corpus_lines` does, so a resumed run continues where it stopped.
        """
        head: list[tuple[str, int]] = []  # the first lines read, for the wrap-around
        head_words = 0
        window: deque[tuple[str, int, int]] = deque()  # (text, words, line number)
        words = 0
        for k, text in enumerate(iter_corpus_lines(self.dataset, split, start_line)):
            n = self._words(text)
            if not n:
                continue
            if head_words < self.min_words:
                head.append((text, n))
                head_words += n
            window.append((text, n, start_line + k))
            words += n
            # The deque is the shortest run of lines reaching min_words for its first line, and
            # (since it was short before this line) for every later first line that still reaches it.
            while window and words >= self.min_words:
                yield self._window(split, list(window))
                words -= window.popleft()[1]
        while window:
            lines = [t for t, _, _ in window]
            got = words
            for text, n in head:
                if got >= self.min_words:
                    break
                lines.append(text)
                got += n
            yield {"id": f"{split}:{window[0][2]}", "lines": lines}
            words -= window.popleft()[1]

    @staticmethod
    def _window(split: str, window: list[tuple[str, int, int]]) -> dict:
        return {"id": f"{split}:{window[0][2]}", "lines": [t for t, _, _ in window]}

    def tokens_of(self, sample: dict) -> list[list[int]]:
        """The sample's words as BPE id groups, `<|endoftext|>` after every non-empty line."""
        lines = sample.get("lines")
        if lines is None:
            lines = [sample.get("text", "")]
        words: list[list[int]] = []
        for line in lines:
            w = self.tokenizer.encode_words(str(line))
            if w:
                words.extend(w)
                words.append([EOT_ID])
        return words

    def load(self, sample: dict, *, train: bool, rng: np.random.Generator) -> dict:
        if not train:
            rng = _seed_for(str(sample["id"]), self.eval_seed)
        words = self.tokens_of(sample)
        ids, labels, word_index = whole_word_mask(words, rng, self.mask_prob)
        ids = truncate_keep_last(ids, self.max_len)
        labels = truncate_keep_last(labels, self.max_len)
        word_index = truncate_keep_last(word_index, self.max_len)
        return {
            "id": str(sample["id"]),
            "ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "word_index": torch.tensor(word_index, dtype=torch.long),
        }

    def collate(self, items: list[dict], *, train: bool, rng: np.random.Generator) -> dict[str, Any]:
        if not items:
            raise ConfigError(f"task {self.cfg.name!r}: cannot collate an empty batch")
        width = max(len(it["ids"]) for it in items)
        b = len(items)
        ids = torch.full((b, width), PAD_ID, dtype=torch.long)
        valid = torch.zeros((b, width), dtype=torch.bool)
        labels = torch.full((b, width), -1, dtype=torch.long)
        for i, it in enumerate(items):
            n = len(it["ids"])
            ids[i, :n] = it["ids"]
            valid[i, :n] = True
            labels[i, :n] = it["labels"]
        has = labels.ge(0)
        k = max(int(has.sum(1).max()), 1)
        read = torch.zeros((b, k), dtype=torch.long)
        read_mask = torch.zeros((b, k), dtype=torch.bool)
        token_targets = torch.full((b, k), -1, dtype=torch.long)
        for i in range(b):
            pos = torch.nonzero(has[i]).flatten()
            read[i, : len(pos)] = pos + 1  # fused position: after the SPE prefix
            read_mask[i, : len(pos)] = True
            token_targets[i, : len(pos)] = labels[i, pos]
        lookup = self._label_lookup()
        targets = torch.where(token_targets.ge(0), lookup[token_targets.clamp(min=0)], torch.full_like(token_targets, IGNORE))
        return {
            "ids": ids, "valid": valid, "labels": labels, "read": read, "read_mask": read_mask,
            "token_targets": token_targets, "targets": targets, "sample_ids": [it["id"] for it in items],
        }

    # -- targets ------------------------------------------------------------------------------------
    def corpus_token_ids(self) -> list[int]:
        """Sorted ids used anywhere in the dataset (all splits) plus <|endoftext|>."""
        seen: set[int] = {EOT_ID}
        for split in self.dataset.splits:
            for text in iter_corpus_lines(self.dataset, split):
                seen.update(self.tokenizer.encode(text))
        return sorted(seen)

    def target_set(self) -> TargetSet:
        if self._targets is None:
            self._targets = vocab_target_set(None if self.vocab == "full" else self.corpus_token_ids())
        return self._targets

    def _label_lookup(self) -> Tensor:
        if self._lookup is None:
            lookup = torch.full((VOCAB_SIZE,), IGNORE, dtype=torch.long)
            ids = torch.tensor([int(v) for v in self.target_set().labels], dtype=torch.long)
            lookup[ids] = torch.arange(len(ids))
            self._lookup = lookup
        return self._lookup

    # -- training / evaluation -------------------------------------------------------------------------
    def _logits(self, model: UniPerceiver, batch: dict[str, Any], targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        hidden, _ = model.hidden([TextSegment(batch["ids"], batch["valid"])])
        mask = batch["read_mask"].to(hidden.device)
        feats = model.read_out(hidden, batch["read"])[mask]  # [M, D]
        logits = model.logits(feats, targets, self.scale)
        return logits, batch["targets"].to(hidden.device)[mask], hidden

    def loss(self, model: UniPerceiver, batch: dict[str, Any], targets: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        if targets is None:
            raise ConfigError(f"task {self.cfg.name!r}: MLM needs the encoded vocabulary targets")
        logits, tgt, hidden = self._logits(model, batch, targets)
        keep = tgt.ne(IGNORE)
        if not bool(keep.any()):
            # no masked word in this batch: a zero that still touches the graph
            return hidden.sum() * 0.0 + logits.sum() * 0.0, {"accuracy": 0.0, "masked_tokens": 0.0}
        loss = F.cross_entropy(logits[keep].float(), tgt[keep], label_smoothing=self.label_smoothing)
        acc = float((logits[keep].argmax(-1) == tgt[keep]).float().mean().item() * 100.0)
        return loss, {"accuracy": acc, "masked_tokens": float(keep.sum().item())}

    @torch.no_grad()
    def evaluate_batch(self, model: UniPerceiver, batch: dict[str, Any], targets: Tensor | None) -> list[dict]:
        if targets is None:
            raise ConfigError(f"task {self.cfg.name!r}: MLM needs the encoded vocabulary targets")
        logits, tgt, _ = self._logits(model, batch, targets)
        correct = (logits.argmax(-1) == tgt) & tgt.ne(IGNORE)
        counts = batch["read_mask"].sum(1).tolist()
        out, start = [], 0
        for sid, n in zip(batch["sample_ids"], counts):
            seg_t = tgt[start : start + n]
            out.append({"id": sid, "correct": int(correct[start : start + n].sum()), "total": int(seg_t.ne(IGNORE).sum())})
            start += n
        return out

    def compute_metrics(self, predictions: list[dict]) -> dict[str, float]:
        total = sum(int(p["total"]) for p in predictions)
        correct = sum(int(p["correct"]) for p in predictions)
        if total == 0:
            return {"accuracy": 0.0, "masked_tokens": 0.0, "num_samples": float(len(predictions))}
        return {"accuracy": 100.0 * correct / total, "masked_tokens": float(total), "num_samples": float(len(predictions))}
