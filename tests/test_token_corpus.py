"""The pre-tokenised corpus path of MLM against the text path, on real text in the bookswiki layout.

The corpus is gensim's shipped Lee news corpus (one sentence per line), a Russian novel extract (the same
package's Crime and Punishment: multi-byte UTF-8, long lines) and a file of awkward lines (blank and
whitespace-only lines, CRLF, a line that cleans to nothing, a literal `<|endoftext|>`, a long word of
many BPE pieces). Both paths read the same prepared dataset; windows, masked ids, labels and word
indices must be identical for the same generator.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path

import gensim.test.utils as gensim_data
import numpy as np
import pytest
import torch

from uniperceiver.data import token_corpus
from uniperceiver.data.corpus_index import CorpusIndex
from uniperceiver.data.format import iter_corpus_lines, open_dataset, prepare_dataset
from uniperceiver.data.token_corpus import TokenCorpus
from uniperceiver.errors import ConfigError, DataError
from uniperceiver.modeling.model_config import model_config
from uniperceiver.tasks import build_task, task_config
from uniperceiver.tasks import masking
from uniperceiver.tasks.masking import whole_word_mask, whole_word_mask_array
from uniperceiver.tasks.mlm import CorpusWindows, MaskedLM, TokenWindows
from uniperceiver.tokenizers.text import EOT_ID, ClipTokenizer, get_tokenizer

AWKWARD = (
    "Plain opening line.\n"
    "\n"
    "  \t \n"
    "A Windows line end.\r\n"
    "&nbsp;\n"  # not blank as text, but cleans to nothing: a line without words
    "Before <|endoftext|> after, a literal special token.\n"
    "Pneumonoultramicroscopicsilicovolcanoconiosis and antidisestablishmentarianism!!!???\n"
    "caf\u00e9 na\u00efve \u4e2d\u6587 \U0001f600 emoji\n"
    "Last line without a newline."
)


def _lee_sentences() -> str:
    text = Path(gensim_data.datapath("lee_background.cor")).read_text(encoding="utf-8")
    return "\n".join(s for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bookswiki")
    raw = root / "raw"
    (raw / "news").mkdir(parents=True)
    (raw / "books").mkdir()
    (raw / "news" / "lee.txt").write_text(_lee_sentences(), encoding="utf-8")
    shutil.copy(gensim_data.datapath("crime-and-punishment.txt"), raw / "books" / "crime.txt")
    (raw / "books" / "awkward.txt").write_bytes(AWKWARD.encode("utf-8"))
    prepare_dataset("bookswiki", raw, root / "data")
    return root / "data"


def _task(data: Path, **options) -> MaskedLM:
    return build_task(task_config("bookswiki-mlm", options={"vocab": "full", **options}), data, model_config("tiny"))


def _same_load(task: MaskedLM, fast: dict, text: dict, rng_fast, rng_text, train: bool = True) -> None:
    a = task.load(fast, train=train, rng=rng_fast)
    b = task.load(text, train=train, rng=rng_text)
    for key in ("ids", "labels", "word_index"):
        assert a[key].dtype == b[key].dtype == torch.long
        assert torch.equal(a[key], b[key]), (fast["id"], key)
    assert a["id"] == b["id"]


@pytest.mark.parametrize("options", [{}, {"min_words": 12, "max_len": 24, "mask_prob": 0.5}])
def test_token_windows_equal_the_text_windows_and_masks(corpus, options):
    task = _task(corpus, **options)
    fast = task.examples("train")
    assert isinstance(fast, TokenWindows)
    text = CorpusWindows(fast.index, "train", task._words, task.min_words)
    n = len(fast)
    assert n == len(text) == len(list(iter_corpus_lines(task.dataset, "train"))) > 2500
    picks = set(np.random.default_rng(0).choice(n, size=150, replace=False).tolist()) | {0, 1, n - 3, n - 2, n - 1}
    masked = random_ids = 0
    for i in sorted(picks):
        assert fast[i] == text[i], i  # same lines packed, same id (wrapping at the end included)
        for seed in (0, 1, 2):
            _same_load(task, fast[i], text[i], np.random.default_rng([seed, i]), np.random.default_rng([seed, i]))
        _same_load(task, fast[i], text[i], None, None, train=False)  # the id-seeded evaluation masking
        got = task.load(fast[i], train=True, rng=np.random.default_rng([9, i]))
        labelled = got["labels"].ge(0)
        masked += int(labelled.sum())
        random_ids += int((labelled & got["ids"].ne(got["labels"]) & got["ids"].ne(49410)).sum())
    assert masked > 1000 and random_ids > 20  # the comparison covered masking and random replacement
    assert fast[-1] == text[n - 1] and fast[2:4] == [text[2], text[3]]
    with pytest.raises(IndexError, match="outside"):
        fast[n]


def test_mask_array_replays_the_loop_draw_for_draw():
    """Word lists with many-piece words, masking probabilities up to 1 (every word drawn, many random-id
    words, the 32-bit buffer of the generator carried across calls): same output, same generator state."""
    tok = get_tokenizer()
    words = tok.encode_words(_lee_sentences()[:4000] + " Pneumonoultramicroscopicsilicovolcanoconiosis " * 3)
    words = [w + [EOT_ID] if k % 17 == 16 else w for k, w in enumerate(words)]
    flat = np.array([t for w in words for t in w], dtype=np.uint16)
    ends = np.zeros(flat.size, dtype=bool)
    ends[np.cumsum([len(w) for w in words]) - 1] = True
    for prob in (0.15, 0.5, 1.0):
        for seed in range(40):
            loop_rng, array_rng = np.random.default_rng(seed), np.random.default_rng(seed)
            for _ in range(3):  # consecutive windows on one generator: its state must carry over exactly
                expect = whole_word_mask(words, loop_rng, prob)
                got = whole_word_mask_array(flat, ends, array_rng, prob)
                assert [r.tolist() for r in got] == [list(e) for e in expect], (prob, seed)
                assert array_rng.bit_generator.state == loop_rng.bit_generator.state
    other = np.random.Generator(np.random.MT19937(5))  # not PCG64: the loop itself runs
    assert [r.tolist() for r in whole_word_mask_array(flat, ends, other, 0.5)] == \
        [list(e) for e in whole_word_mask(words, np.random.Generator(np.random.MT19937(5)), 0.5)]
    empty = whole_word_mask_array(np.zeros(0, np.uint16), np.zeros(0, bool), np.random.default_rng(0))
    assert empty.shape == (3, 0)


def test_random_ids_follow_numpy_through_a_rejected_draw():
    """Lemire's rejection (a 32-bit draw numpy throws away, ~3.5 in a million) is replayed as numpy does."""
    vocab = 49411
    raw = np.random.default_rng(0).bit_generator.random_raw(1_000_000)
    low = raw & np.uint64(0xFFFFFFFF)
    rejected = np.flatnonzero(((low * np.uint64(vocab)) & np.uint64(0xFFFFFFFF)) < (2**32 - vocab) % vocab)
    assert rejected.size  # draw `rejected[0]`'s low half is refused by numpy's integers()
    for offset in (0, 1):  # the refused half first, or after one accepted draw (the buffered high half)
        ours, numpy_rng = np.random.default_rng(0), np.random.default_rng(0)
        for rng in (ours, numpy_rng):
            rng.bit_generator.advance(int(rejected[0]) - offset)
        draws = masking._Pcg64Draws(ours.bit_generator, 4)
        got = draws.integers(vocab, 5)
        draws.finish()
        assert got.tolist() == numpy_rng.integers(0, vocab, size=5).tolist()
        assert ours.bit_generator.state == numpy_rng.bit_generator.state


def test_cache_is_built_once_beside_the_index_and_rebuilt_when_the_corpus_changes(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text(AWKWARD, encoding="utf-8")
    data = tmp_path / "data"
    prepare_dataset("bookswiki", raw, data)
    ds = open_dataset("bookswiki", data)
    tok = get_tokenizer()
    tokens = TokenCorpus.open(CorpusIndex.open(ds, "train"), "train", tok)
    where = data / "bookswiki" / "index"
    assert sorted(p.name for p in where.iterdir() if p.name.startswith("train.tok")) == \
        ["train.token_lines.npy", "train.tokens.json", "train.tokens.u16"]
    assert isinstance(tokens.tokens.base, np.memmap) and tokens.tokens.dtype == np.uint16
    lines = list(iter_corpus_lines(ds, "train"))
    for i, line in enumerate(lines):  # each line: its BPE ids, then <|endoftext|> when it has words
        words = tok.encode_words(line)
        assert tokens.line_ids(i).tolist() == ([t for w in words for t in w] + [EOT_ID] if words else [])
    assert tokens.line_ids(lines.index("&nbsp;")).size == 0

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt although nothing changed")

    with monkeypatch.context() as m:
        m.setattr(token_corpus, "_build", no_rebuild)
        assert len(TokenCorpus.open(CorpusIndex.open(ds, "train"), "train", tok)) == len(lines)
    with open(raw / "a.txt", "a", encoding="utf-8") as fh:
        fh.write("\nOne more line, added later.\n")
    prepare_dataset("bookswiki", raw, data)
    ds = open_dataset("bookswiki", data)
    again = TokenCorpus.open(CorpusIndex.open(ds, "train"), "train", tok)
    assert len(again) == len(lines) + 1
    assert again.line_ids(len(lines)).tolist() == tok.encode("One more line, added later.") + [EOT_ID]


def test_an_interrupted_build_leaves_nothing_that_passes_for_a_cache(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text("".join(f"Sentence {i} of the book.\n" for i in range(50)), encoding="utf-8")
    prepare_dataset("bookswiki", raw, tmp_path / "data")
    index = CorpusIndex.open(open_dataset("bookswiki", tmp_path / "data"), "train")
    tok = get_tokenizer()
    first = TokenCorpus.open(index, "train", tok)
    where = Path(index.npy).parent
    monkeypatch.setattr(token_corpus, "tokenizer_key", lambda: "another tokenizer")  # forces a rebuild
    monkeypatch.setattr(token_corpus, "_BLOCK", 8)

    def fail_late(tokenizer, text):
        if text.startswith("Sentence 30 "):
            raise KeyboardInterrupt
        return real(tokenizer, text)

    real = token_corpus._line_ids
    monkeypatch.setattr(token_corpus, "_line_ids", fail_late)
    with pytest.raises(KeyboardInterrupt):  # in this process: the patched function reaches no worker
        TokenCorpus.open(index, "train", tok, workers=1)
    assert not (where / "train.tokens.json").exists()  # the old metadata went first: no stale cache
    assert not [p.name for p in where.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(token_corpus, "_line_ids", real)
    rebuilt = TokenCorpus.open(index, "train", tok)
    assert rebuilt.meta["tokenizer"] == "another tokenizer"
    assert np.array_equal(rebuilt.tokens, first.tokens) and np.array_equal(rebuilt.cum_words, first.cum_words)


def _cache_files(index: CorpusIndex) -> dict[str, bytes]:
    where = Path(index.npy).parent
    names = ("train.tokens.u16", "train.token_lines.npy", "train.tokens.json")
    return {name: (where / name).read_bytes() for name in names}


def test_a_build_in_worker_processes_writes_the_same_bytes(corpus, tmp_path, monkeypatch):
    """Small blocks, so that dozens go through the pool of two spawned workers and come back in order."""
    raw = corpus.parent / "raw"
    monkeypatch.setattr(token_corpus, "_BLOCK", 64)
    built, calls = {}, []
    for name, workers in (("one", None), ("two", 2)):
        prepare_dataset("bookswiki", raw, tmp_path / name)  # the same files, so the same stamps in the meta
        index = CorpusIndex.open(open_dataset("bookswiki", tmp_path / name), "train")
        with monkeypatch.context() as m:
            if workers is None:
                m.setenv("UPCTL_TOKENIZE_WORKERS", "1")  # read when `workers` is not given
                m.setattr(token_corpus, "_pool_blocks", None)  # any use of the pool fails
            else:
                m.setattr(token_corpus, "_local_blocks", None)  # any use of the in-process loop fails
            tokens = TokenCorpus.open(index, "train", get_tokenizer(), workers=workers,
                                      progress=lambda done, total, what, name=name: calls.append((name, done, total)))
        built[name] = _cache_files(index)
    n = len(tokens)
    assert n > token_corpus._POOL_MIN_BLOCKS * 64 and tokens.meta["tokens"] > 50_000
    assert built["one"] == built["two"]
    for name in ("one", "two"):  # the progress callback: from the main process, block after block, in order
        assert [done for who, done, total in calls if who == name] == [*range(64, n, 64), n]
    lines = list(iter_corpus_lines(open_dataset("bookswiki", tmp_path / "two"), "train"))
    tok = get_tokenizer()
    for i in (0, 63, 64, 65, n // 2, n - 1):  # block edges included
        words = tok.encode_words(lines[i])
        assert tokens.line_ids(i).tolist() == ([t for w in words for t in w] + [EOT_ID] if words else [])


def test_the_worker_count_comes_from_the_argument_then_the_environment(monkeypatch):
    monkeypatch.delenv("UPCTL_TOKENIZE_WORKERS", raising=False)
    assert token_corpus._worker_count(None) == min(os.cpu_count() or 1, 8)
    assert token_corpus._worker_count(3) == 3
    monkeypatch.setenv("UPCTL_TOKENIZE_WORKERS", "5")
    assert token_corpus._worker_count(None) == 5 and token_corpus._worker_count(2) == 2
    for value in ("two", "0"):
        monkeypatch.setenv("UPCTL_TOKENIZE_WORKERS", value)
        with pytest.raises(ConfigError, match="UPCTL_TOKENIZE_WORKERS"):
            token_corpus._worker_count(None)


class FailingTokenizer(ClipTokenizer):
    """The real tokenizer, except on one line of the corpus, where it raises or ends its process. It is
    pickled into the spawned workers (they import it from this module), which a monkeypatch never reaches."""

    def __init__(self, bad_line: str, how: str) -> None:
        super().__init__()
        self.bad_line, self.how = bad_line, how

    def encode_words(self, text: str) -> list[list[int]]:
        if text == self.bad_line:
            if self.how == "exit":
                os._exit(3)  # a worker killed mid-block (out of memory, a signal)
            raise ValueError(f"cannot tokenise {text[:20]!r}\nsecond line of the message")
        return super().encode_words(text)


@pytest.mark.parametrize("how", ["raise", "exit"])
def test_a_failing_worker_leaves_no_cache_and_one_line(corpus, tmp_path, monkeypatch, how):
    prepare_dataset("bookswiki", corpus.parent / "raw", tmp_path / "data")
    ds = open_dataset("bookswiki", tmp_path / "data")
    index = CorpusIndex.open(ds, "train")
    where = Path(index.npy).parent
    monkeypatch.setattr(token_corpus, "_BLOCK", 64)
    first = TokenCorpus.open(index, "train", get_tokenizer(), workers=1)
    monkeypatch.setattr(token_corpus, "tokenizer_key", lambda: "another tokenizer")  # forces a rebuild
    bad = list(iter_corpus_lines(ds, "train"))[len(index) // 2]  # a real line, in a block well inside the run
    with pytest.raises(DataError) as caught:
        TokenCorpus.open(index, "train", FailingTokenizer(bad, how), workers=2)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{where}: tokenising the corpus failed in a worker process")
    assert ("ValueError: cannot tokenise" if how == "raise" else "BrokenProcessPool") in message
    assert not (where / "train.tokens.json").exists()
    assert not [p.name for p in where.iterdir() if p.name.endswith(".tmp")]
    rebuilt = TokenCorpus.open(index, "train", get_tokenizer(), workers=1)  # the next open builds it again
    assert rebuilt.meta["tokenizer"] == "another tokenizer"
    assert np.array_equal(rebuilt.tokens, first.tokens) and np.array_equal(rebuilt.cum_tokens, first.cum_tokens)


def test_a_damaged_cache_is_refused_with_the_file_named(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text("Alpha beta.\nGamma delta.\n", encoding="utf-8")
    prepare_dataset("bookswiki", raw, tmp_path / "data")
    index = CorpusIndex.open(open_dataset("bookswiki", tmp_path / "data"), "train")
    TokenCorpus.open(index, "train", get_tokenizer())
    ids = Path(index.npy).parent / "train.tokens.u16"
    ids.write_bytes(ids.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"train\.tokens\.u16: holds 7 ids, its metadata 8; delete .* to rebuild"):
        TokenCorpus.open(index, "train", get_tokenizer())
    (Path(index.npy).parent / "train.token_lines.npy").unlink()
    with pytest.raises(DataError, match=r"index: cannot map the tokenised corpus .*; delete the folder to rebuild it"):
        TokenCorpus.open(index, "train", get_tokenizer())


def test_windows_wrap_and_short_corpora_take_every_line(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text("One two three.\nFour five.\n&nbsp;\nSix.\n", encoding="utf-8")
    prepare_dataset("bookswiki", raw, tmp_path / "data")
    # words per line (with <|endoftext|>): 5, 4, 0 (cleans to nothing), 3
    for min_words, expect in ((6, [(0, 2), (1, 3), (2, 3), (3, 2)]), (100, [(i, 4) for i in range(4)])):
        task = _task(tmp_path / "data", min_words=min_words)
        fast = task.examples("train")
        text = CorpusWindows(fast.index, "train", task._words, task.min_words)
        assert [fast.tokens.window_lines(i, min_words) for i in range(4)] == expect
        assert list(fast) == list(text)
        for i in range(4):
            _same_load(task, fast[i], text[i], np.random.default_rng(i), np.random.default_rng(i))


def test_spawned_workers_and_the_corpus_vocabulary(corpus):
    task = _task(corpus, vocab="corpus")
    fast = task.examples("train")
    clone = pickle.loads(pickle.dumps(fast))  # what a spawned loader worker receives
    assert clone[123] == fast[123] and np.array_equal(clone[123].tokens.ids, fast[123].tokens.ids)
    assert isinstance(clone.tokens.tokens.base, np.memmap)
    seen = {EOT_ID}
    for text in iter_corpus_lines(task.dataset, "train"):
        seen.update(task.tokenizer.encode(text))
    assert task.corpus_token_ids() == sorted(seen)


def test_bench_row_measures_both_paths_on_the_real_corpus():
    from uniperceiver.bench.sections import _in_subprocess

    r = _in_subprocess("_corpus_token_worker", 1, 300)  # one thread, in its own process, as the bench runs it
    assert r["lines"] == len(_lee_sentences().splitlines())
    assert r["text_per_s"] > 0 and r["token_per_s"] > 3 * r["text_per_s"]  # loose: a shared machine is noisy
    assert r["cache_mb"] > 0 and r["build_s"] > 0
