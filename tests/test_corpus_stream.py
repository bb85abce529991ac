"""Streamed text corpora through the trainer: the memory-mapped line index, the lazy MLM windows, the
keyed permutation that replaces the per-epoch array for very large tasks, and an MLM training run on a
bookswiki-layout corpus that is interrupted and resumed exactly.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from uniperceiver.config import recipe_from_dict
from uniperceiver.data import corpus_index
from uniperceiver.data.corpus_index import CorpusIndex
from uniperceiver.data.format import iter_corpus_lines, open_dataset, prepare_dataset
from uniperceiver.engine import sampler as sampler_module
from uniperceiver.engine.sampler import KeyedPermutation, ResumableBatchSampler
from uniperceiver.engine.trainer import train
from uniperceiver.errors import DataError

sys.path.insert(0, str(Path(__file__).parent))
from _trainer_fixtures import one_thread  # noqa: E402,F401  (shared fixture)

TRICKY = (
    "First line of the book.\n"
    "\n"
    "   \t \n"
    "Windows line end.\r\n"
    "\u00a0\u3000\n"  # Unicode whitespace only: blank for str.strip()
    "\u4e2d\u6587\u53e5\u5b50\u3002\n"  # no ASCII at all, not blank
    "A line long enough to cross several scan chunks when the chunk is a few bytes long.\n"
    "Last line without a newline."
)


def _corpus(tmp_path: Path, texts: dict[str, str]) -> Path:
    raw = tmp_path / "raw"
    for name, text in texts.items():
        (raw / name).parent.mkdir(parents=True, exist_ok=True)
        (raw / name).write_bytes(text.encode("utf-8"))
    prepare_dataset("bookswiki", raw, tmp_path / "data")
    return tmp_path / "data"


def test_index_reads_the_lines_the_stream_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_index, "_CHUNK", 7)  # lines straddle many read chunks
    data = _corpus(tmp_path, {"a/one.txt": TRICKY, "b/two.txt": "Second file.\n\nIts end.\n"})
    ds = open_dataset("bookswiki", data)
    index = CorpusIndex.open(ds, "train")
    streamed = list(iter_corpus_lines(ds, "train"))
    assert len(streamed) == 7 and "\u4e2d\u6587\u53e5\u5b50\u3002" in streamed
    assert [index.line(i) for i in range(len(index))] == streamed
    assert list(index.lines_from(6))[:3] == [streamed[6], streamed[0], streamed[1]]  # wraps to the start
    assert (data / "bookswiki" / "index" / "train.lines.npy").is_file() and isinstance(index.offsets, np.memmap)
    with pytest.raises(IndexError, match="outside"):
        index.line(len(index))

    def no_rescan(path):
        raise AssertionError(f"{path} was scanned again although nothing changed")

    monkeypatch.setattr(corpus_index, "_scan_file", no_rescan)
    assert len(CorpusIndex.open(ds, "train")) == 7


def test_a_changed_file_is_refused_until_prepared_again(tmp_path):
    data = _corpus(tmp_path, {"one.txt": "Alpha.\nBeta.\n"})
    assert len(CorpusIndex.open(open_dataset("bookswiki", data), "train")) == 2
    with open(tmp_path / "raw" / "one.txt", "a") as fh:
        fh.write("Gamma, added later.\n")
    with pytest.raises(DataError, match=r"one\.txt: the manifest counts 2 .* has 3; .*prepare the dataset again"):
        CorpusIndex.open(open_dataset("bookswiki", data), "train")
    prepare_dataset("bookswiki", tmp_path / "raw", data)
    index = CorpusIndex.open(open_dataset("bookswiki", data), "train")
    assert [index.line(i) for i in range(3)] == ["Alpha.", "Beta.", "Gamma, added later."]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 4097])
def test_keyed_permutation_is_a_seeded_bijection(n):
    perm = KeyedPermutation(n, key=12345)
    values = [perm[i] for i in range(n)]
    assert sorted(values) == list(range(n))
    assert values == [KeyedPermutation(n, key=12345)[i] for i in range(n)]
    if n >= 64:
        assert values != [KeyedPermutation(n, key=54321)[i] for i in range(n)]
        assert values != list(range(n))


def test_large_task_sampler_shards_every_epoch_and_resumes(monkeypatch):
    monkeypatch.setattr(sampler_module, "ARRAY_LIMIT", 4)  # 23 samples count as "large"
    n, world, batch = 23, 3, 5

    def make(rank, state=None):
        return ResumableBatchSampler(n, batch, seed=7, key="bookswiki-mlm", rank=rank, world_size=world, state=state)

    for epoch_check in (0, 1):
        seen = []
        for rank in range(world):
            s = make(rank, sampler_module.BatchSamplerState(epoch_check, 0))
            size = s.shard_size()
            seen += [s._sample_at(epoch_check, k) for k in range(size)]
        assert sorted(seen) == list(range(n))  # the ranks' shards partition the epoch
    first = make(0)
    order = [first.next_batch()[0] for _ in range(4)]  # 20 samples: rank 0 reads 8 per epoch
    flat = [pair for b in order for pair in b]
    assert [e for e, _ in flat] == [0] * 8 + [1] * 8 + [2] * 4
    assert len({i for _, i in flat[:8]}) == 8 and [i for _, i in flat[:8]] != [i for _, i in flat[8:16]]
    again = make(0)
    again.next_batch()
    resumed = make(0, sampler_module.BatchSamplerState(**again.state_dict()))
    assert [resumed.next_batch()[0] for _ in range(3)] == order[1:]


def _mlm_recipe(max_steps: int, workers: int):
    return recipe_from_dict({
        "name": "stream",
        "model": {"size": "tiny", "overrides": {"depth": 1}},
        "optim": {"lr": 1e-3, "warmup_steps": 1, "weight_decay": 0.0},
        "train": {"max_steps": max_steps, "ckpt_every": 2, "log_every": 1, "seed": 0, "num_workers": workers},
        "tasks": [{"name": "bookswiki-mlm", "batch_size": 4,
                   "options": {"min_words": 6, "max_len": 24, "vocab": "corpus", "mask_prob": 0.5}}],
    })


def test_mlm_training_on_a_streamed_corpus_resumes_exactly(tmp_path, monkeypatch):
    """The windows are read from disk by forked loader workers; the sampler takes the keyed-permutation
    path; a run stopped at step 3 and resumed gives the losses of the uninterrupted run."""
    monkeypatch.setattr(sampler_module, "ARRAY_LIMIT", 4)
    text = "".join(f"Sentence number {i} tells of rain, wind and the sea.\n" for i in range(40))
    data = _corpus(tmp_path, {"books/a.txt": text[: len(text) // 2], "books/b.txt": text[len(text) // 2:]})
    whole = train(_mlm_recipe(6, 2), output=tmp_path / "whole", data_dir=data, log=lambda m: None)
    assert whole.step == 6 and all(np.isfinite(loss) for _, _, loss in whole.history)
    # An interruption after step 2: the same run with every later checkpoint and the final weights gone.
    shutil.copytree(whole.run_dir, tmp_path / "cut")
    for later in ("step-000004", "step-000006"):
        shutil.rmtree(tmp_path / "cut" / "checkpoints" / later, ignore_errors=True)
    shutil.rmtree(tmp_path / "cut" / "final")
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir() if p.name.startswith("step-")) == ["step-000002"]
    rest = train(_mlm_recipe(6, 2), output=tmp_path / "cut", data_dir=data, log=lambda m: None, resume="auto")
    assert rest.step == 6 and len(rest.history) == 4
    assert [loss for _, _, loss in rest.history] == [loss for _, _, loss in whole.history[2:]]
