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
sequence (`TokenWindows`) over a memory-mapped line index (`data/corpus_index.py`) and the corpus
tokenised once (`data/token_corpus.py`), both built on first use beside the manifest: window i is
sliced from the memory-mapped ids when the loader asks for it and masked in numpy
(`masking.whole_word_mask_array`), with the same windows, masks and labels as tokenising its text
(`CorpusWindows` + `whole_word_mask`, kept as the reference path), about ten times faster. The trainer
samples a BooksWiki-size corpus with the usual per-epoch permutation and exact resume, in memory that
does not grow with the corpus. `MaskedLM.iter_examples(split, start_line)` streams the same windows as
text in order (one pass, for tools that read the corpus sequentially). The corpus vocabulary of a
streamed corpus is counted from the stored ids.

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
from torch.nn.utils.rnn import pad_sequence

from uniperceiver.data.corpus_index import CorpusIndex
from uniperceiver.data.format import iter_corpus_lines
from uniperceiver.data.token_corpus import TokenCorpus, TokenWindow
from uniperceiver.errors import ConfigError
from uniperceiver.modeling.model import TextSegment, UniPerceiver
from uniperceiver.tasks.base import TargetSet, Task, vocab_target_set
from uniperceiver.tasks.family_options import MLMOptions
from uniperceiver.tasks.masking import (
    truncate_keep_last,
    truncate_keep_last_array,
    whole_word_mask,
    whole_word_mask_array,
)
from uniperceiver.tokenizers.text import EOT_ID, PAD_ID, VOCAB_SIZE

IGNORE = -100


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


class TokenizedWindow(dict):
    """A window of a pre-tokenised corpus: the text path's {"id", "lines"} (so both paths give equal
    samples) plus its ids and word ends in the attribute `tokens`, which `MaskedLM.load` masks directly."""

    tokens: TokenWindow


class TokenWindows(CorpusWindows):
    """`CorpusWindows` over a pre-tokenised corpus (`data/token_corpus.py`): a window's lines are found
    from the stored word counts and its ids sliced from the memory-mapped array, so nothing is tokenised
    on access; the lines' text is read back (one read per file) for the sample's "lines"."""

    def __init__(self, index: CorpusIndex, split: str, tokens: TokenCorpus, min_words: int) -> None:
        super().__init__(index, split, None, min_words)  # words are counted from the stored ids, not the text
        self.tokens = tokens

    def __len__(self) -> int:
        return self.tokens.n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        i = int(i)
        n = self.tokens.n
        if i < 0:
            i += n
        window = self.tokens.window(i, self.min_words)  # raises IndexError outside the split
        first, count = window.first_line, window.line_count
        lines = self.index.read_lines(first, min(count, n - first))
        if first + count > n:
            lines += self.index.read_lines(0, first + count - n)
        sample = TokenizedWindow(id=f"{self.split}:{i}", lines=lines)
        sample.tokens = window
        return sample


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
                index, tokens = self._token_corpus(split)
                self._examples[split] = TokenWindows(index, split, tokens, self.min_words)
            else:
                self._examples[split] = list(self.iter_examples(split))
        return self._examples[split]

    def _token_corpus(self, split: str) -> tuple[CorpusIndex, TokenCorpus]:
        """The line index and the pre-tokenised lines of a streamed split (each built once, then reused)."""
        index = CorpusIndex.open(self.dataset, split)
        return index, TokenCorpus.open(index, split, self.tokenizer)

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
        if isinstance(sample, TokenizedWindow):  # pre-tokenised: the same masks, drawn in numpy
            window = sample.tokens
            rows = truncate_keep_last_array(whole_word_mask_array(window.ids, window.word_end, rng, self.mask_prob),
                                            self.max_len)
            ids, labels, word_index = torch.from_numpy(rows[0]), torch.from_numpy(rows[1]), torch.from_numpy(rows[2])
        else:
            words = self.tokens_of(sample)
            lists = whole_word_mask(words, rng, self.mask_prob)
            ids, labels, word_index = (torch.tensor(truncate_keep_last(a, self.max_len), dtype=torch.long)
                                       for a in lists)
        return {"id": str(sample["id"]), "ids": ids, "labels": labels, "word_index": word_index}

    def collate(self, items: list[dict], *, train: bool, rng: np.random.Generator) -> dict[str, Any]:
        if not items:
            raise ConfigError(f"task {self.cfg.name!r}: cannot collate an empty batch")
        # Vectorised (one op per field, not per row): the loader collates every batch in the training loop.
        b = len(items)
        lengths = torch.tensor([len(it["ids"]) for it in items], dtype=torch.long)
        ids = pad_sequence([it["ids"] for it in items], batch_first=True, padding_value=PAD_ID)
        labels = pad_sequence([it["labels"] for it in items], batch_first=True, padding_value=-1)
        valid = torch.arange(ids.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
        has = labels.ge(0)
        k = max(int(has.sum(1).max()), 1)
        read = torch.zeros((b, k), dtype=torch.long)
        read_mask = torch.zeros((b, k), dtype=torch.bool)
        token_targets = torch.full((b, k), -1, dtype=torch.long)
        rows, cols = has.nonzero(as_tuple=True)  # row by row, positions ascending
        slot = has.cumsum(1)[rows, cols] - 1  # the label's rank within its row
        read[rows, slot] = cols + 1  # fused position: after the SPE prefix
        read_mask[rows, slot] = True
        token_targets[rows, slot] = labels[rows, cols]
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
            if self.streaming(split):  # counted from the pre-tokenised ids: no text pass
                seen.update(np.flatnonzero(self._token_corpus(split)[1].token_counts()).tolist())
                continue
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
