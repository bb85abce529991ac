"""Seeded few-shot subsets: the reference's size rules, saved files, and determinism across processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from fixtures import layouts

from uniperceiver.data.fewshot import first_listed_answer, fraction_subset, most_common_answer, select_ids
from uniperceiver.data.format import ManifestWriter, open_dataset, prepare_dataset, write_meta
from uniperceiver.errors import DataError

CLASS_SIZES = [250, 120, 99, 5]  # per-class counts of the classification fixture


def _prepared(data: Path, name: str, samples: list[dict], media_type: str = "image", rule: str | None = None):
    with ManifestWriter(data / name, "train") as w:
        for s in samples:
            w.add(s)
    meta = {"dataset": name, "raw_root": str(data), "splits": {"train": len(samples)}, "media_type": media_type}
    if rule:
        meta["fewshot_rule"] = rule
    write_meta(data / name, meta)
    return open_dataset(name, data)


def _classification(data: Path):
    samples = [
        {"id": f"c{c}-{i:03d}", "media": f"img/{c}/{i}.jpg", "media_type": "image", "label": c}
        for c, n in enumerate(CLASS_SIZES)
        for i in range(n)
    ]
    return _prepared(data, "cls", samples, rule="per_class")


def test_per_class_reference_sizes_and_saved_file(tmp_path):
    ds = _classification(tmp_path)
    sub = fraction_subset(ds, "train", 0.01, seed=0)
    assert Counter(s["label"] for s in sub) == {0: 3, 1: 2, 2: 1, 3: 1}  # int(0.01 * n) + 1 per class
    assert sum(Counter(s["label"] for s in fraction_subset(ds, "train", 0.1, seed=0)).values()) == 26 + 13 + 10 + 1
    path = ds.root / "splits" / "train-f0.01-s0.json"
    saved = json.loads(path.read_text())
    assert saved["rule"] == "per_class" and saved["seed"] == 0 and saved["fraction"] == 0.01
    assert saved["ids"] == [s["id"] for s in sub] and saved["dataset"] == "cls"
    # loaded, not redrawn: the same list even if the file is the only source of truth
    mtime = path.stat().st_mtime_ns
    assert fraction_subset(ds, "train", 0.01, seed=0) == sub and path.stat().st_mtime_ns == mtime
    other = fraction_subset(ds, "train", 0.01, seed=1)
    assert [s["id"] for s in other] != [s["id"] for s in sub]
    # a changed manifest invalidates the saved subset
    _prepared(tmp_path, "cls", ds.load_split("train")[:-5], rule="per_class")  # class 3 removed
    redrawn = fraction_subset(open_dataset("cls", tmp_path), "train", 0.01, seed=0)
    assert Counter(s["label"] for s in redrawn) == {0: 3, 1: 2, 2: 1}
    assert json.loads(path.read_text())["manifest_sha256"] != saved["manifest_sha256"]


def test_per_image_per_item_per_label_per_answer_sizes(tmp_path):
    images = [{"id": str(i), "media": f"{i}.jpg", "media_type": "image", "texts": ["a", "b"]} for i in range(1000)]
    assert len(select_ids(images, 0.01, 0, "per_image")) == 10
    assert len(select_ids(images[:50], 0.01, 0, "per_image")) == 1
    videos = [{"id": str(i), "media": f"{i}.avi", "media_type": "video", "texts": ["x"]} for i in range(1200)]
    assert len(select_ids(videos, 0.01, 3, "per_item")) == 12
    glue = [{"id": str(i), "text": "t", "label": int(i % 3 == 0)} for i in range(300)]
    picked = select_ids(glue, 0.01, 0, "per_label")
    assert Counter(int(i) % 3 == 0 for i in map(int, picked)) == {False: 3, True: 2}
    vqa = [
        {"id": str(i), "question": "q", "answer_scores": {"yes": 1.0} if i < 150 else {"2": 0.9, "3": 0.6}}
        for i in range(250)
    ]
    picked = [int(i) for i in select_ids(vqa, 0.01, 0, "per_answer")]
    assert sum(i < 150 for i in picked) == 2 and sum(i >= 150 for i in picked) == 2
    assert most_common_answer({"answer_scores": {"b": 0.6, "a": 0.6, "c": 0.3}}) == "a"
    with pytest.raises(DataError, match="no label"):
        select_ids([{"id": "1"}], 0.5, 0, "per_class")
    with pytest.raises(DataError, match="unknown few-shot rule"):
        select_ids(images, 0.5, 0, "per_pixel")


def test_rule_comes_from_the_preparer(tmp_path):
    raw, data = tmp_path / "coco", tmp_path / "data"
    layouts.make_vqav2(raw)
    prepare_dataset("vqav2", raw, data, options={"min_count": "1"})
    ds = open_dataset("vqav2", data)
    sub = fraction_subset(ds, "train", 0.01, seed=0)
    assert json.loads((ds.root / "splits" / "train-f0.01-s0.json").read_text())["rule"] == "per_answer"
    # prepared train questions (images 9, 25) by the reference's labels[0], the first listed human
    # answer: yes x3, 2 x2, and red x1 (red and orange tie on score; red comes first in the
    # annotation); int(0.01 * n) + 1 = one question per group
    listed = set(ds.answers)
    assert sorted(first_listed_answer(s, listed) for s in sub) == ["2", "red", "yes"]
    assert sorted(most_common_answer(s) for s in sub) == ["2", "orange", "yes"]  # not the rule any more
    with pytest.raises(DataError, match=r"fraction must be in \(0, 1\]"):
        fraction_subset(ds, "train", 1.5, seed=0)
    with pytest.raises(DataError, match="seed must be a non-negative integer"):
        fraction_subset(ds, "train", 0.5, seed=-1)


_CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
from uniperceiver.data.fewshot import fraction_subset
from uniperceiver.data.format import open_dataset
sub = fraction_subset(open_dataset("cls", {data!r}), "train", 0.05, seed=7)
print(json.dumps([s["id"] for s in sub]))
"""


def test_identical_across_runs_and_processes(tmp_path):
    ds = _classification(tmp_path / "a")
    here = [s["id"] for s in fraction_subset(ds, "train", 0.05, seed=7)]
    shutil.rmtree(ds.root / "splits")
    assert [s["id"] for s in fraction_subset(ds, "train", 0.05, seed=7)] == here  # drawn again: identical
    outs = []
    for hashseed in ("1", "12345"):
        copy = tmp_path / f"copy{hashseed}"
        shutil.copytree(ds.root, copy / "cls", ignore=shutil.ignore_patterns("splits"))
        env = {**os.environ, "PYTHONHASHSEED": hashseed}
        code = _CHILD.format(tests=str(Path(__file__).parent), data=str(copy))
        r = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=str(Path(__file__).parent.parent),
        )
        assert r.returncode == 0, r.stderr
        outs.append(json.loads(r.stdout))
    assert outs[0] == outs[1] == here


# -- the streamed draw: the same ids as the draw over the whole list, without ever holding it ------
def _reference_select_ids(samples: list[dict], fraction: float, seed: int, rule: str, answers=None) -> list[str]:
    """The draw as it was before it streamed (a list of dicts, grouped with Python lists), kept as
    the oracle: saved subset files on users' disks must keep matching."""
    from uniperceiver.data.fewshot import _UNIFORM, _group_key, _group_seed

    listed = set(answers) if answers is not None else None
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        key = _group_key(rule, s, "", listed)
        if key is not None:
            groups.setdefault(key, []).append(i)
    chosen: list[int] = []
    for key in sorted(groups):
        members = groups[key]
        n = len(members)
        k = min(max(1, int(fraction * n)) if rule in _UNIFORM else int(fraction * n) + 1, n)
        chosen.extend(members[j] for j in _group_seed(seed, key).choice(n, size=k, replace=False))
    return [str(samples[i]["id"]) for i in sorted(chosen)]


class _Reads:
    """Counts rows decoded from Arrow (`ArrowRows[i]`) and refuses `load_split` (the whole split as a
    list): a check on what is held, not on time."""

    def __init__(self, monkeypatch) -> None:
        from uniperceiver.data.arrow_manifest import ArrowRows
        from uniperceiver.data.format import PreparedDataset

        self.decoded = 0
        getitem = ArrowRows.__getitem__

        def counting(rows, index):
            self.decoded += 1
            return getitem(rows, index)

        def refuse(dataset, split):
            raise AssertionError(f"load_split({split!r}) materialised the whole split")

        monkeypatch.setattr(ArrowRows, "__getitem__", counting)
        monkeypatch.setattr(PreparedDataset, "load_split", refuse)


def _official_pools(tmp_path: Path) -> Path:
    """COCO trainval (per_image view), MSVD trainval (per_pair, one row per caption) and VQAv2
    trainval_vg (per_answer, minval excluded), prepared from fixtures in the official layouts."""
    data, fast = tmp_path / "data", {"check": "exists"}
    layouts.make_coco(tmp_path / "coco")
    prepare_dataset("coco", tmp_path / "coco", data, options=fast)
    fx = layouts.make_msvd_pairs(tmp_path / "msvd", clips=20, captions=15)
    prepare_dataset("msvd", tmp_path / "msvd", data, options={**fast, "split_sizes": fx["split_sizes"]})
    layouts.make_vg(tmp_path / "vg", qa=True)
    prepare_dataset("vg", tmp_path / "vg", data, options=fast)
    layouts.make_vqav2(tmp_path / "vqa")
    prepare_dataset("vqav2", tmp_path / "vqa", data, options={**fast, "min_count": "1", "minval_size": "1"})
    return data


def test_the_streamed_draw_selects_what_the_whole_list_selects(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("skimage")
    prepare_dataset("mini", None, tmp_path, options={"only": "digits,photos,news,sentiment"})
    data = _official_pools(tmp_path)
    cases = [(open_dataset(name, tmp_path), "train") for name in ("mini-digits", "mini-photos", "mini-news",
                                                                   "mini-sentiment")]
    cases += [(open_dataset("coco", data), "trainval"), (open_dataset("msvd", data), "trainval"),
              (open_dataset("vqav2", data), "trainval_vg"), (open_dataset("vqav2", data), "train")]
    seen = set()
    for ds, split in cases:
        whole = ds.load_split(split)
        default = fraction_subset(ds, split, 0.01, seed=0)[0] and json.loads(
            (ds.root / "splits" / f"{split}-f0.01-s0.json").read_text())["rule"]
        for rule in {default, "per_item"}:
            seen.add(rule)
            for fraction, seed in ((0.01, 0), (0.1, 3), (0.5, 11), (1.0, 2)):
                reference = _reference_select_ids(whole, fraction, seed, rule, ds.answers)
                assert select_ids(whole, fraction, seed, rule, answers=ds.answers) == reference
                assert select_ids(ds.rows(split), fraction, seed, rule, answers=ds.answers) == reference
                assert select_ids(iter(whole), fraction, seed, rule, answers=ds.answers) == reference
                sub = fraction_subset(ds, split, fraction, seed, rule=rule)
                assert [s["id"] for s in sub] == reference, (ds.name, split, rule, fraction, seed)
                by_id = {str(s["id"]): s for s in whole}
                assert sub == [by_id[i] for i in reference]  # whole samples, as the list gives them
                assert fraction_subset(ds, split, fraction, seed, rule=rule) == sub  # reused from the file
                saved = json.loads((ds.root / "splits" / f"{split}-f{fraction:g}-s{seed}.json").read_text())
                assert saved["ids"] == reference and saved["pool_size"] == len(whole) == ds.num_samples(split)
    assert seen == {"per_class", "per_image", "per_item", "per_label", "per_pair", "per_answer"}


def test_a_draw_never_holds_the_whole_split(tmp_path, monkeypatch):
    data = _official_pools(tmp_path)
    coco, msvd, vqa = (open_dataset(n, data) for n in ("coco", "msvd", "vqav2"))
    expected = {(ds.name, split): [s["id"] for s in fraction_subset(ds, split, 0.5, seed=0)]
                for ds, split in ((coco, "trainval"), (msvd, "trainval"), (vqa, "trainval_vg"), (coco, "train"))}
    reads = _Reads(monkeypatch)
    for (name, split), ids in expected.items():
        ds = open_dataset(name, data)
        reads.decoded = 0
        assert [s["id"] for s in fraction_subset(ds, split, 0.5, seed=0)] == ids  # reuse: only the subset's rows
        assert reads.decoded == len(ids), (name, split)
        (ds.root / "splits" / f"{split}-f0.5-s0.json").unlink()
        reads.decoded = 0
        assert [s["id"] for s in fraction_subset(ds, split, 0.5, seed=0)] == ids  # fresh draw
        if name != "vqav2":  # a uniform rule reads no row to draw, then decodes the chosen ones
            assert reads.decoded == len(ids), (name, split)


def test_a_saved_subset_that_does_not_fit_the_split_says_what_to_do(tmp_path):
    ds = _classification(tmp_path)
    fraction_subset(ds, "train", 0.01, seed=0)
    path = ds.root / "splits" / "train-f0.01-s0.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "ids": [*saved["ids"], "c9-999"]}))
    with pytest.raises(DataError) as err:
        fraction_subset(ds, "train", 0.01, seed=0)
    assert str(err.value) == f"{path}: 'ids' do not match split 'train'; delete it to draw the subset again"
    path.write_text(json.dumps({**saved, "ids": "c0-000"}))
    with pytest.raises(DataError, match=r"'ids' do not match split 'train'; delete it"):
        fraction_subset(ds, "train", 0.01, seed=0)
    path.write_text("{\n  \"ids\": [,\n")
    with pytest.raises(DataError, match=r"train-f0\.01-s0\.json:2: malformed JSON \(.*\); delete it to draw the subset"):
        fraction_subset(ds, "train", 0.01, seed=0)
