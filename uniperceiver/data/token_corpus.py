"""Pre-tokenised text corpora: every non-blank line of a streamed corpus tokenised once, memory-mapped.

Why: an MLM window of a BooksWiki-style corpus used to be cleaned (ftfy) and BPE-encoded every time the
loader read it, and every line sits in about as many windows as it takes lines to reach `min_words`,
so each line was tokenised ~18 times per epoch. Here each line is tokenised once, on first use, and a
window becomes a slice of a memory-mapped id array: no text, no tokenizer.

Files, beside the line index (`<dataset>/index/`, see `corpus_index.py`):

- `<split>.tokens.u16`: the BPE ids of every line in order, each line that has words followed by
  `<|endoftext|>` (raw little-endian uint16: all 49,411 ids fit);
- `<split>.token_lines.npy`: int64 [2, N + 1], the tokens (row 0) and words (row 1) before line i, so
  that a window's lines are found by a binary search over word counts and its ids by two lookups (rows,
  not columns: a binary search needs a contiguous array, or numpy copies it first);
- `<split>.tokens.json`: what they were built from (the corpus files' sizes and modification times,
  the tokenizer, the counts). It is written last and removed before a rebuild, so a build cut short
  is never mistaken for a finished one; every file is written to a temp name and renamed.

Word boundaries need no storage: in CLIP's BPE the last piece of every word, and only it, ends with
"</w>", and the special ids are words of their own, so "ends a word" is a lookup on the id.
A line's word count is `len(encode_words(line)) + 1` (the `<|endoftext|>`) when it has words, else 0,
as the text path counts it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from uniperceiver.data.corpus_index import CorpusIndex
from uniperceiver.errors import DataError, StorageError
from uniperceiver.tokenizers.text import BPE_PATH, EOT_ID, SOT_ID, VOCAB_SIZE, ClipTokenizer
from uniperceiver.utils.files import atomic_write_json, sha256_file
from uniperceiver.utils.progress import Progress

FORMAT = 1
_BLOCK = 4096  # lines read and tokenised per step while building


class TokenWindow(NamedTuple):
    """One packed window: its lines (first line, how many, wrapping to line 0) and their ids."""

    first_line: int
    line_count: int
    ids: np.ndarray  # uint16 [T]
    word_end: np.ndarray  # bool [T]: the id is the last piece of its word


def word_end_table(tokenizer: ClipTokenizer) -> np.ndarray:
    """bool [VOCAB_SIZE]: True for ids that end a word (a "</w>" piece or a special id)."""
    table = np.zeros(VOCAB_SIZE, dtype=bool)
    for i in range(SOT_ID):
        table[i] = tokenizer.id_to_token(i).endswith("</w>")
    table[SOT_ID:] = True
    return table


def tokenizer_key() -> str:
    """What the cached ids depend on besides the text: the merge list and the text cleaner's version."""
    return f"clip-bpe:{sha256_file(BPE_PATH)[:16]}:ftfy-{metadata.version('ftfy')}"


class TokenCorpus:
    """The tokenised lines of one split, memory-mapped; windows are built from them in numpy."""

    def __init__(self, where: Path, split: str, meta: dict, word_end: np.ndarray) -> None:
        self.where = where
        self.split = split
        self.meta = meta
        self.word_end_of = word_end  # [VOCAB_SIZE] lookup
        self._map()

    def _map(self) -> None:
        count, n = int(self.meta["tokens"]), int(self.meta["lines"])
        path = self.where / f"{self.split}.tokens.u16"
        lines_path = self.where / f"{self.split}.token_lines.npy"
        try:
            size = path.stat().st_size
            # Plain ndarray views of the mappings (slicing a np.memmap costs more); numpy cannot map an
            # empty file, and an empty corpus simply has no ids.
            tokens = np.asarray(np.memmap(path, dtype="<u2", mode="r")) if count and size else np.zeros(0, "<u2")
            lines = np.asarray(np.load(lines_path, mmap_mode="r"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{self.where}: cannot map the tokenised corpus ({exc}); "
                            "delete the folder to rebuild it") from None
        rebuild = f"delete {self.where} to rebuild it"
        if size != 2 * count:
            raise DataError(f"{path}: holds {size // 2:,} ids, its metadata {count:,}; {rebuild}")
        if lines.shape != (2, n + 1):
            raise DataError(f"{lines_path}: shape {lines.shape}, expected (2, {n + 1}); {rebuild}")
        self.tokens, self.cum_tokens, self.cum_words, self.n = tokens, lines[0], lines[1], n

    # -- building / opening --------------------------------------------------------------------------
    @classmethod
    def open(cls, index: CorpusIndex, split: str, tokenizer: ClipTokenizer,
             progress: Progress | None = None) -> "TokenCorpus":
        """The tokenised `split` of `index`'s corpus, built first when missing or out of date.

        A lock file makes concurrent openers (ranks on one machine) wait for one build.
        """
        where = Path(index.npy).parent
        meta_path = where / f"{split}.tokens.json"
        want = {"format": FORMAT, "files": index.stamps, "tokenizer": tokenizer_key(), "lines": len(index)}
        with _locked(where / f".{split}.tokens.lock"):
            meta = _read_meta(meta_path)
            if meta is None or any(meta.get(k) != v for k, v in want.items()):
                meta = _build(index, split, tokenizer, where, want, progress)
        return cls(where, split, meta, word_end_table(tokenizer))

    # -- reading -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n

    def line_ids(self, i: int) -> np.ndarray:
        """The ids of line i (with its `<|endoftext|>`; empty when the line has no word)."""
        return self.tokens[int(self.cum_tokens[i]):int(self.cum_tokens[i + 1])]

    def window_lines(self, i: int, min_words: int) -> tuple[int, int]:
        """(first, count) of window i: line i and the lines after it until `min_words` words, wrapping to
        line 0 at most once (the whole corpus when it holds fewer words)."""
        n = self.n
        if not 0 <= i < n:
            raise IndexError(f"window {i} outside the split's {n:,} windows")
        cum = self.cum_words
        target = int(cum[i]) + int(min_words)
        total = int(cum[n])
        if target <= total:
            return i, int(cum.searchsorted(target, side="left")) - i
        wrapped = int(cum.searchsorted(target - total, side="left"))  # lines 0 .. wrapped - 1 after the end
        return i, n - i + min(wrapped, i)

    def window(self, i: int, min_words: int) -> TokenWindow:
        """Window i as ids and word ends (see `window_lines`)."""
        first, count = self.window_lines(i, min_words)
        n = self.n
        stop = first + count
        ct = self.cum_tokens
        if stop <= n:
            ids = np.asarray(self.tokens[int(ct[first]):int(ct[stop])])
        else:
            ids = np.concatenate((self.tokens[int(ct[first]):int(ct[n])], self.tokens[:int(ct[stop - n])]))
        return TokenWindow(first, count, ids, self.word_end_of[ids])

    def token_counts(self) -> np.ndarray:
        """int64 [VOCAB_SIZE]: how often each id occurs (read in blocks: memory stays flat)."""
        counts = np.zeros(VOCAB_SIZE, dtype=np.int64)
        step = 1 << 24
        for start in range(0, self.tokens.size, step):
            counts += np.bincount(self.tokens[start:start + step], minlength=VOCAB_SIZE)
        return counts

    def __getstate__(self) -> dict:  # for spawned workers: the mappings are reopened, not copied
        state = dict(self.__dict__)
        for key in ("tokens", "cum_words", "cum_tokens"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._map()


# -- the build ---------------------------------------------------------------------------------------
def _read_meta(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StorageError(f"{path}: cannot create the lock file ({exc.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _line_ids(tokenizer: ClipTokenizer, text: str) -> tuple[list[int], int]:
    """(ids, words) of one line exactly as the text path builds a window from it."""
    words = tokenizer.encode_words(text)
    if not words:
        return [], 0
    return [t for w in words for t in w] + [EOT_ID], len(words) + 1


def _build(index: CorpusIndex, split: str, tokenizer: ClipTokenizer, where: Path, want: dict,
           progress: Progress | None) -> dict:
    meta_path = where / f"{split}.tokens.json"
    tokens_path, lines_path = where / f"{split}.tokens.u16", where / f"{split}.token_lines.npy"
    meta_path.unlink(missing_ok=True)  # from here on, an interrupted build leaves no valid cache
    n = len(index)
    temps: list[str] = []
    try:
        tmp_tokens, tmp_lines = _temp_name(tokens_path, temps), _temp_name(lines_path, temps)
        cum = np.lib.format.open_memmap(tmp_lines, mode="w+", dtype=np.int64, shape=(2, n + 1))
        cum[:, 0] = 0
        tokens = words = 0
        with open(tmp_tokens, "wb") as fh:
            for start in range(0, n, _BLOCK):
                lines = index.read_lines(start, min(_BLOCK, n - start))
                block: list[int] = []
                for k, text in enumerate(lines):
                    ids, w = _line_ids(tokenizer, text)
                    block.extend(ids)
                    tokens += len(ids)
                    words += w
                    cum[:, start + k + 1] = (tokens, words)
                np.asarray(block, dtype="<u2").tofile(fh)
                if progress is not None:
                    progress(start + len(lines), n, f"tokenising {split}")
            fh.flush()
            os.fsync(fh.fileno())
        cum.flush()
        del cum
        os.replace(tmp_tokens, tokens_path)
        os.replace(tmp_lines, lines_path)
    except OSError as exc:
        raise StorageError(f"{where}: could not write the tokenised corpus: {exc.strerror or exc}") from exc
    finally:
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    meta = dict(want, tokens=tokens, words=words)
    atomic_write_json(meta_path, meta)
    return meta


def _temp_name(path: Path, temps: list[str]) -> str:
    """A new temp file beside `path`, recorded in `temps` so that a failed build removes it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    temps.append(tmp)
    return tmp


__all__ = ["TokenCorpus", "TokenWindow", "word_end_table", "tokenizer_key"]
