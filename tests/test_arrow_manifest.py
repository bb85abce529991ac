"""Arrow-backed manifests (data/arrow_manifest.py) give exactly the samples of the JSONL they come from,
by index, in every process; stale, missing or broken Arrow files are converted again, atomically."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from uniperceiver.data.arrow_manifest import ArrowRows, ViewRows, arrow_path, find_rows, is_current
from uniperceiver.data.format import ManifestWriter, open_dataset, prepare_dataset, write_meta
from uniperceiver.errors import DataError

#: One row per layout the preparers and tasks write (docs/DATA-FORMAT.md), with the awkward values:
#: floats that look like ints, unicode, empty and nested lists, free-keyed dicts, null, optional keys.
ROWS = [
    {"id": "cls-1", "media": "n01/a.JPEG", "media_type": "image", "label": 7},
    {"id": "cap-1", "media": "val2014/COCO_1.jpg", "media_type": "image",
     "texts": ["A man \"surfing\" at dusk.", "Ünïcödé caption — with a dash", "emoji 🏄 and tab\tinside"]},
    {"id": "cap-empty", "media": "x.jpg", "media_type": "image", "texts": []},
    {"id": "vid-1", "media": "clips/abc_000010_000020.mp4", "media_type": "video", "start": 10.0, "end": 20.5,
     "label": 0},
    {"id": "vqa-1", "media": "val2014/COCO_2.jpg", "media_type": "image", "question": "What color is it?",
     "question_id": 262148000, "answers": ["red"] * 7 + ["dark red", "red", "maroon"],
     "answer_scores": {"red": 1.0, "dark red": 0.3, "maroon": 0.3}, "answer_type": "other"},
    {"id": "stsb-1", "text": "A plane is taking off.", "text_b": "An air plane is taking off.", "label": 5.0},
    {"id": "glue-1", "text": "it 's a charming journey .", "label": 1},
    {"id": "corpus-1", "text_file": "books/part-00.txt", "lines": 1200},
    {"id": "odd-1", "media": "odd.png", "extra": {"nested": [[1, 2], {"k": None}], "flag": False}},
]


def _dataset(root: Path, splits: dict[str, list[dict]], views: dict | None = None):
    for split, rows in splits.items():
        with ManifestWriter(root / "ds", split) as writer:
            for row in rows:
                writer.add(row)
    write_meta(root / "ds", {"dataset": "ds", "raw_root": str(root / "raw"), "media_type": "mixed",
                             "splits": {k: len(v) for k, v in splits.items()}, **({"views": views} if views else {})})
    return open_dataset("ds", root)


def _exact(rows) -> list[str]:
    """Rows as canonical JSON text: 5.0 and 5, True and 1 stay different (== would not tell them apart)."""
    return [json.dumps(r, sort_keys=True, ensure_ascii=False) for r in rows]


def test_every_layout_round_trips_exactly_by_index(tmp_path):
    ds = _dataset(tmp_path, {"train": ROWS})
    rows = ds.rows("train")
    assert isinstance(rows, ArrowRows) and len(rows) == len(ROWS)
    assert _exact(rows[i] for i in range(len(rows))) == _exact(ROWS) == _exact(ds.samples("train"))
    assert rows[-1] == ROWS[-1] and rows[2:5] == ROWS[2:5] and list(rows) == ROWS
    assert isinstance(rows[5]["label"], float) and isinstance(rows[6]["label"], int)
    assert rows.ids() == [r["id"] for r in ROWS]
    assert rows.num_texts().tolist() == [len(r["texts"]) if "texts" in r else -1 for r in ROWS]
    with pytest.raises(IndexError, match=r"row 9 out of range \(0\.\.8\)"):
        rows[9]
    # the folder holds the JSONL, its Arrow copy and meta.json: no temp file
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["meta.json", "train.arrow", "train.jsonl"]


def test_the_mini_datasets_read_the_same_from_arrow_and_jsonl(tmp_path):
    pytest.importorskip("sklearn")
    prepare_dataset("mini", None, tmp_path, options={"only": "digits,news,sentiment"})
    for name in ("mini-digits", "mini-news", "mini-sentiment"):
        ds = open_dataset(name, tmp_path)
        for split in ds.splits:
            assert is_current(ds.manifest_path(split))  # converted while preparing (the training run need not)
            assert _exact(ds.rows(split)) == _exact(ds.samples(split)) and len(ds.rows(split)) == ds.num_samples(split)


def test_a_dataset_prepared_before_arrow_is_converted_on_first_open(tmp_path):
    ds = _dataset(tmp_path, {"train": ROWS})
    arrow = arrow_path(ds.manifest_path("train"))
    assert not arrow.exists()  # write_meta alone, as a dataset prepared before Arrow copies existed
    assert ds.rows("train")[4] == ROWS[4] and arrow.is_file()
    # an edited JSONL (a row appended) is seen: the Arrow copy is made again
    before = ds.rows("train")
    with open(ds.manifest_path("train"), "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": "late", "texts": ["new"]}) + "\n")
    assert not is_current(ds.manifest_path("train"))
    assert len(ds.rows("train")) == len(ROWS) + 1 and ds.rows("train")[-1]["id"] == "late"
    assert len(before) == len(ROWS) and _exact(before) == _exact(ROWS)  # an open copy keeps its own file
    # a truncated Arrow file (a crash elsewhere, a bad copy) is converted again, not read
    arrow.write_bytes(arrow.read_bytes()[:100])
    assert not is_current(ds.manifest_path("train")) and ds.rows("train")[0] == ROWS[0]
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["meta.json", "train.arrow", "train.jsonl"]


def test_a_malformed_line_is_named_and_leaves_no_arrow_file(tmp_path):
    ds = _dataset(tmp_path, {"train": ROWS[:2]})
    with open(ds.manifest_path("train"), "a", encoding="utf-8") as fh:
        fh.write('{"id": "x", "texts": ["a",,]}\n')
    with pytest.raises(DataError, match=r"train\.jsonl:3: malformed JSON"):
        ds.rows("train")
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["meta.json", "train.jsonl"]


def test_a_folder_that_cannot_take_the_arrow_file_reads_the_jsonl_into_a_list(tmp_path):
    ds = _dataset(tmp_path, {"train": ROWS})
    arrow_path(ds.manifest_path("train")).mkdir()  # the rename onto it fails as on read-only storage
    rows = ds.rows("train")
    assert isinstance(rows, list) and _exact(rows) == _exact(ROWS)
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["meta.json", "train.arrow", "train.jsonl"]


def test_views_by_index_equal_the_streamed_views(tmp_path):
    img = {"media": "a.jpg", "media_type": "image"}
    splits = {
        "train": [{"id": "t1", "texts": ["a", "b"], **img}, {"id": "t2", "texts": ["c"], **img},
                  {"id": "t3", "texts": [], **img}],
        "val": [{"id": "v1", "texts": ["d", "e"], **img}, {"id": "v2", "texts": ["f"], **img}],
        "minval": [{"id": "v2", "texts": ["f"], **img}],
        "bare": [{"id": "b1", **img}],
    }
    views = {
        "pairs": {"parts": ["train", "val"], "unit": "pair", "num_samples": 6},
        "held": {"parts": ["train", "val"], "exclude": "minval", "unit": "sample", "num_samples": 4},
        "heldpairs": {"parts": ["train", "val"], "exclude": "minval", "unit": "pair", "num_samples": 5},
        "badpairs": {"parts": ["bare"], "unit": "pair", "num_samples": 0},
        "odd": {"parts": ["train"], "unit": "word", "num_samples": 0},
    }
    ds = _dataset(tmp_path, splits, views)
    for view in ("pairs", "held", "heldpairs"):
        rows = ds.rows(view)
        assert isinstance(rows, ViewRows) and len(rows) == ds.num_samples(view)
        assert _exact(rows) == _exact(ds.samples(view))
    assert [r["id"] for r in ds.rows("heldpairs")] == ["t1#0", "t1#1", "t2#0", "v1#0", "v1#1"]
    assert ds.rows("pairs")[-1] == {**splits["val"][1], "id": "v2#0", "texts": ["f"], "parent_id": "v2"}
    with pytest.raises(DataError, match=r"bare\.jsonl sample 'b1': view 'badpairs' pairs captions"):
        ds.rows("badpairs")
    with pytest.raises(DataError, match="view 'odd' has unit 'word'"):
        ds.rows("odd")
    with pytest.raises(DataError, match="has no split 'nope'"):
        ds.rows("nope")
    # a few ids found by index (a saved few-shot subset) in manifests, views and the list fallback
    wanted = {"t2", "v1", "v2", "t1#1", "v1#0", "v2#0", "gone", "t3#0"}
    assert find_rows(ds.rows("train"), wanted) == {"t2": 1}
    assert find_rows(ds.rows("held"), wanted) == {"t2": 1, "v1": 3}  # v2 is excluded
    assert find_rows(ds.rows("pairs"), wanted) == {"t1#1": 1, "v1#0": 3, "v2#0": 5}
    assert find_rows(ds.rows("heldpairs"), wanted) == {"t1#1": 1, "v1#0": 3}
    assert find_rows(ds.load_split("pairs"), wanted) == find_rows(ds.rows("pairs"), wanted)
    assert find_rows(ds.rows("pairs"), set()) == {}


def _read_in_worker(rows: ArrowRows, i: int) -> tuple[int, dict]:
    return os.getpid(), rows[i]


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, rows: ArrowRows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, dict]:
        return _read_in_worker(self.rows, i)


def test_forked_workers_and_pickled_copies_read_the_same_rows(tmp_path):
    ds = _dataset(tmp_path, {"train": ROWS})
    rows = ds.rows("train")
    state = pickle.dumps(rows)
    assert len(state) < 500  # the path travels, not the rows
    assert _exact(pickle.loads(state)) == _exact(ROWS)
    loader = DataLoader(_Indexed(rows), batch_size=None, num_workers=2, collate_fn=lambda x: x,
                        generator=torch.Generator().manual_seed(0))
    got = list(loader)
    assert {pid for pid, _ in got} - {os.getpid()} and os.getpid() not in {pid for pid, _ in got}
    assert _exact(row for _, row in got) == _exact(ROWS)


def test_a_task_trains_from_the_arrow_rows_with_loader_workers(tmp_path):
    pytest.importorskip("sklearn")
    from uniperceiver.engine.loader import MultiTaskLoader
    from uniperceiver.modeling.model_config import model_config
    from uniperceiver.tasks.catalog import build_task, task_config
    from uniperceiver.tokenizers.text import get_tokenizer

    prepare_dataset("mini", None, tmp_path, options={"only": "digits"})
    task = build_task(task_config("mini-digits"), tmp_path, model_config("tiny"), get_tokenizer())
    examples = task.examples("train")
    assert isinstance(examples, ArrowRows) and len(examples) == open_dataset("mini-digits", tmp_path).num_samples("train")
    # the same draws, the same pixels: from the JSONL as a list, from Arrow here and in forked workers
    runs = []
    for rows, workers in ((task.dataset.load_split("train"), 0), (examples, 0), (examples, 2)):
        loader = MultiTaskLoader([task], [rows], weights=[1.0], batch_sizes=[8], seed=3, num_workers=workers)
        runs.append([next(loader) for _ in range(3)])
    assert len({i for b in runs[0] for i in b.ids}) == 24
    for other in runs[1:]:
        assert [b.ids for b in other] == [b.ids for b in runs[0]]
        assert all(torch.equal(a.batch["pixels"], b.batch["pixels"]) for a, b in zip(other, runs[0]))
