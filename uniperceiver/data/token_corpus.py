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

The build tokenises blocks of lines in spawned worker processes (a BooksWiki-size corpus takes hours on
one core) and writes them in order from the main process, so the files are byte for byte those of the
one-process loop, which `workers=1` and corpora under `_POOL_MIN_BLOCKS` blocks still use (a worker's
start costs ~2 s of CPU, mostly imports: one process tokenises ~130k short lines in about 5 s). `workers`
of `TokenCorpus.open` picks the count; when it is None the environment variable `UPCTL_TOKENIZE_WORKERS`
does, else min(CPUs, 8).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import multiprocessing
import os
import signal
import tempfile
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from uniperceiver.data.corpus_index import CorpusIndex
from uniperceiver.errors import ConfigError, DataError, StorageError
from uniperceiver.tokenizers.text import BPE_PATH, EOT_ID, SOT_ID, VOCAB_SIZE, ClipTokenizer
from uniperceiver.utils.files import atomic_write_json, sha256_file
from uniperceiver.utils.progress import Progress

FORMAT = 1
_BLOCK = 4096  # lines read and tokenised per step while building
_POOL_MIN_BLOCKS = 32  # smaller corpora are tokenised in the building process: a pool would not pay its start
_MAX_WORKERS = 8  # the default's cap: a build on a large node leaves cores to the ranks and loaders beside it
_Block = tuple[np.ndarray, np.ndarray]  # a block's ids (uint16 [T]) and per-line token / word counts (int64 [2, L])


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
             progress: Progress | None = None, workers: int | None = None) -> "TokenCorpus":
        """The tokenised `split` of `index`'s corpus, built first when missing or out of date.

        A lock file makes concurrent openers (ranks on one machine) wait for one build. `workers`: the
        processes that tokenise a build (None: `UPCTL_TOKENIZE_WORKERS`, else min(CPUs, 8)).
        """
        where = Path(index.npy).parent
        meta_path = where / f"{split}.tokens.json"
        want = {"format": FORMAT, "files": index.stamps, "tokenizer": tokenizer_key(), "lines": len(index)}
        with _locked(where / f".{split}.tokens.lock"):
            meta = _read_meta(meta_path)
            if meta is None or any(meta.get(k) != v for k, v in want.items()):
                meta = _build(index, split, tokenizer, where, want, progress, workers)
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


def _tokenise_block(tokenizer: ClipTokenizer, lines: list[str]) -> _Block:
    """One block as compact arrays; both build paths call it, so both write the same bytes."""
    ids: list[int] = []
    counts = np.zeros((2, len(lines)), dtype=np.int64)
    for k, text in enumerate(lines):
        line, words = _line_ids(tokenizer, text)
        ids.extend(line)
        counts[0, k], counts[1, k] = len(line), words
    return np.asarray(ids, dtype="<u2"), counts


def _worker_count(workers: int | None) -> int:
    """The processes a build uses: `workers`, else `UPCTL_TOKENIZE_WORKERS`, else min(CPUs, 8)."""
    source = "workers"
    if workers is None:
        env = os.environ.get("UPCTL_TOKENIZE_WORKERS", "").strip()
        if not env:
            return min(os.cpu_count() or 1, _MAX_WORKERS)
        source = "UPCTL_TOKENIZE_WORKERS"
        try:
            workers = int(env)
        except ValueError:
            raise ConfigError(f"UPCTL_TOKENIZE_WORKERS={env!r}: expected a whole number of processes >= 1") from None
    if workers < 1:
        raise ConfigError(f"{source}={workers}: expected a whole number of processes >= 1")
    return workers


def _local_blocks(index: CorpusIndex, tokenizer: ClipTokenizer) -> Iterator[_Block]:
    """The blocks tokenised in this process: no pool to start, the right choice for small corpora."""
    n = len(index)
    for start in range(0, n, _BLOCK):
        yield _tokenise_block(tokenizer, index.read_lines(start, min(_BLOCK, n - start)))


# The one exception to "no module state": a pool task reaches its process's tokenizer only through the
# module. Set by `_start_worker` in spawned build workers, never in the process that builds.
_worker_tokenizer: ClipTokenizer | None = None


def _start_worker(tokenizer: ClipTokenizer) -> None:
    """Pool initializer: keep the build's tokenizer (unpickled once per worker, not once per block, and
    its word cache stays warm). Ctrl-C reaches the whole process group; workers ignore it so that only
    the main process stops the build, shuts the pool down and removes its temp files."""
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_tokenizer = tokenizer


def _tokenise_in_worker(lines: list[str]) -> _Block:
    assert _worker_tokenizer is not None, "runs only in a pool started by _pool_blocks"
    return _tokenise_block(_worker_tokenizer, lines)


def _pool_blocks(index: CorpusIndex, tokenizer: ClipTokenizer, workers: int, where: Path) -> Iterator[_Block]:
    """The blocks tokenised by `workers` spawned processes, yielded in corpus order.

    Spawned, not forked: the calling process may hold threads (a fork copies their locks mid-use). At
    most 2 blocks per worker are in flight, so memory stays flat however long the corpus is. A worker
    that raises or dies ends the build with one DataError naming `where` and the cause.
    """
    n = len(index)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(tokenizer,))
    pending: deque[Future[_Block]] = deque()
    starts = iter(range(0, n, _BLOCK))
    try:
        while True:
            for start in starts:
                pending.append(pool.submit(_tokenise_in_worker, index.read_lines(start, min(_BLOCK, n - start))))
                if len(pending) >= 2 * workers:
                    break
            if not pending:
                return
            try:
                block = pending.popleft().result()
            except Exception as exc:  # the worker's own error, or BrokenProcessPool when one died
                cause = " ".join(f"{type(exc).__name__}: {exc}".split())
                raise DataError(f"{where}: tokenising the corpus failed in a worker process ({cause}); "
                                "nothing was cached") from exc
            yield block
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _build(index: CorpusIndex, split: str, tokenizer: ClipTokenizer, where: Path, want: dict,
           progress: Progress | None, workers: int | None = None) -> dict:
    meta_path = where / f"{split}.tokens.json"
    tokens_path, lines_path = where / f"{split}.tokens.u16", where / f"{split}.token_lines.npy"
    n = len(index)
    workers = _worker_count(workers)
    meta_path.unlink(missing_ok=True)  # from here on, an interrupted build leaves no valid cache
    temps: list[str] = []
    try:
        tmp_tokens, tmp_lines = _temp_name(tokens_path, temps), _temp_name(lines_path, temps)
        cum = np.lib.format.open_memmap(tmp_lines, mode="w+", dtype=np.int64, shape=(2, n + 1))
        cum[:, 0] = 0
        done = tokens = words = 0
        if workers > 1 and n >= _POOL_MIN_BLOCKS * _BLOCK:
            blocks = _pool_blocks(index, tokenizer, min(workers, n // _BLOCK), where)
        else:
            blocks = _local_blocks(index, tokenizer)
        with open(tmp_tokens, "wb") as fh, contextlib.closing(blocks):
            for ids, counts in blocks:
                ids.tofile(fh)
                count = counts.shape[1]
                cum[:, done + 1:done + count + 1] = np.cumsum(counts, axis=1) + [[tokens], [words]]
                done += count
                tokens, words = int(cum[0, done]), int(cum[1, done])
                if progress is not None:
                    progress(done, n, f"tokenising {split}")
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
