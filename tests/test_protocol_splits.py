"""The reference's training pools and 1% draws, end to end on fixtures in the official layouts.

fundamentalvision/Uni-Perceiver, uniperceiver/datasets/task_dataset/: msvd.py / msrvtt.py
`load_data` pool train + val, flatten to one sample per (video, caption) pair and draw
int(fraction * n_pairs) pairs; image_text_pair.py pools COCO / Flickr30k train + val and draws
int(fraction * n) images; vqa.py trains on train + val[:-3000] + Visual Genome QA and draws per
`labels[0]`. Here those pools are prepared views and the draws are seeded and saved.
"""

from __future__ import annotations

import json

import pytest
from fixtures import layouts

from uniperceiver.data.fewshot import first_listed_answer, fraction_subset, select_ids
from uniperceiver.data.format import open_dataset, prepare_dataset
from uniperceiver.errors import DataError

FAST = {"check": "exists"}


def _saved(ds, split: str, fraction: float, seed: int) -> dict:
    return json.loads((ds.root / "splits" / f"{split}-f{fraction:g}-s{seed}.json").read_text())


def test_msvd_draws_pairs_from_train_and_val(tmp_path):
    raw, data = tmp_path / "msvd", tmp_path / "data"
    fx = layouts.make_msvd_pairs(raw, clips=20, captions=15)
    s = prepare_dataset("msvd", raw, data, options={**FAST, "split_sizes": fx["split_sizes"]})
    n = fx["pairs"]  # (10 train + 5 val clips) x 15 captions = 225
    assert s.splits == {"train": 10, "val": 5, "test": 5} and s.views == {"trainval": n}
    ds = open_dataset("msvd", data)
    pool = ds.load_split("trainval")
    assert len(pool) == ds.num_samples("trainval") == n
    first = pool[0]
    assert first["id"] == f"{fx['train'][0]}#0" and first["parent_id"] == fx["train"][0]
    assert first["texts"] == [ds.load_split("train")[0]["texts"][0]] and first["media"].endswith(".avi")

    for fraction in (0.01, 0.1):
        sub = fraction_subset(ds, "trainval", fraction, seed=0)
        assert len(sub) == int(fraction * n)  # 2 and 22 pairs, not int(fraction * 10 clips)
        assert all(len(x["texts"]) == 1 for x in sub)
    saved = _saved(ds, "trainval", 0.01, 0)
    assert (saved["rule"], saved["pool"], saved["unit"], saved["pool_size"]) == ("per_pair", ["train", "val"], "pair", n)

    # every pair is eligible: over a few seeds, val clips are drawn too
    drawn = {x["parent_id"] for seed in range(12) for x in fraction_subset(ds, "trainval", 0.01, seed=seed)}
    assert drawn & set(fx["val"]) and drawn & set(fx["train"])
    assert not drawn - set(fx["train"]) - set(fx["val"])  # and never a test clip


def test_msrvtt_pools_are_the_9k_videos_and_the_official_train_val(tmp_path):
    raw, data = tmp_path / "msrvtt", tmp_path / "data"
    layouts.make_msrvtt(raw, captions=30)
    s = prepare_dataset("msrvtt", raw, data, options=FAST)
    # train.9k lists video0-3 (the reference's 1k-A pool); the official train + val is video0-3 too here
    assert s.views == {"trainval9k": 4 * 30, "trainval": 4 * 30}
    ds = open_dataset("msrvtt", data)
    assert ds.views["trainval9k"]["parts"] == ["train9k"] and ds.views["trainval"]["parts"] == ["train", "val"]
    sub = fraction_subset(ds, "trainval9k", 0.05, seed=3)
    assert len(sub) == 6 and {x["parent_id"] for x in sub} <= {"video0", "video1", "video2", "video3"}
    saved = _saved(ds, "trainval9k", 0.05, 3)
    assert (saved["rule"], saved["pool"], saved["unit"]) == ("per_pair", ["train9k"], "pair")
    drawn = {x["parent_id"] for seed in range(20) for x in fraction_subset(ds, "trainval", 0.01, seed=seed)}
    assert "video3" in drawn  # the official val video is in the pool
    # without the 9k list there is no 9k pool
    (raw / "MSRVTT_train.9k.csv").unlink()
    prepare_dataset("msrvtt", raw, data, options=FAST)
    assert set(open_dataset("msrvtt", data).views) == {"trainval"}


def test_coco_pool_is_train_plus_val_whole_images(tmp_path):
    raw, data = tmp_path / "coco", tmp_path / "data"
    layouts.make_coco(raw)
    s = prepare_dataset("coco", raw, data, options=FAST)
    assert s.views == {"trainval": 3 + 2}  # 3 train (incl. restval) + 2 val images
    ds = open_dataset("coco", data)
    assert [x["id"] for x in ds.load_split("trainval")] == ["1000", "1001", "1003", "1005", "1006"]
    pool = {x["id"]: x for x in ds.load_split("trainval")}
    sub = fraction_subset(ds, "trainval", 0.5, seed=0)
    assert len(sub) == 2 and all(x == pool[x["id"]] for x in sub)  # int(0.5 * 5) images, with all their captions
    assert _saved(ds, "trainval", 0.5, 0)["rule"] == "per_image"
    drawn = {x["id"] for seed in range(10) for x in fraction_subset(ds, "trainval", 0.2, seed=seed)}
    assert drawn & {"1005", "1006"}  # val images are in the pool


def test_vqa_trainval_vg_counts_and_draw(tmp_path):
    data = tmp_path / "data"
    vg = layouts.make_vg(tmp_path / "vg", qa=True)
    prepare_dataset("vg", tmp_path / "vg", data, options=FAST)  # first: vqav2 reads its "qa" split
    layouts.make_vqav2(tmp_path / "coco")
    s = prepare_dataset("vqav2", tmp_path / "coco", data, options={**FAST, "min_count": "1", "minval_size": "1"})
    assert s.splits == {"train": 6, "val": 2, "minval": 1, "vg_qa": 3}
    assert s.skipped["vg_qa"] == vg["vg_qa"]["skipped"]
    # train 6 + val 2 - the last 1 by question id + 3 VG questions whose answer is listed
    assert s.views == {"trainval": 6 + 2 - 1, "trainval_vg": 6 + 2 - 1 + 3}
    ds = open_dataset("vqav2", data)
    assert [x["id"] for x in ds.load_split("minval")] == ["42001"]
    pool = ds.load_split("trainval_vg")
    assert len(pool) == ds.num_samples("trainval_vg") == 10
    assert [x["id"] for x in pool if x.get("source") == "vg"] == vg["vg_qa"]["ids"]
    assert "42001" not in {x["id"] for x in pool}
    two = next(x for x in pool if x["id"] == "vg986770")  # VG "two" on COCO image 9 (train2014)
    assert two["answer_scores"] == {"2": 1.0} and two["media"] == "train2014/COCO_train2014_000000000009.jpg"
    assert next(x for x in pool if x["id"] == "vg986771")["media"] == "val2014/COCO_val2014_000000000042.jpg"

    # per labels[0]: yes x5, "2" x3, red x1, "1" x1 -> int(0.01 * n) + 1 = one question each
    sub = fraction_subset(ds, "trainval_vg", 0.01, seed=0)
    assert sorted(first_listed_answer(x, set(ds.answers)) for x in sub) == ["1", "2", "red", "yes"]
    saved = _saved(ds, "trainval_vg", 0.01, 0)
    assert (saved["rule"], saved["pool"], saved["exclude"]) == ("per_answer", ["train", "val", "vg_qa"], "minval")

    # the default held-out count is the reference's 3,000; option vg=none leaves Visual Genome out
    prepare_dataset("vqav2", tmp_path / "coco", data, options={**FAST, "min_count": "1", "vg": "none"})
    ds = open_dataset("vqav2", data)
    assert ds.meta["minval_size"] == 3000 and "vg_qa" not in ds.splits and set(ds.views) == {"trainval"}
    with pytest.raises(DataError, match=r"has no split 'trainval_vg' \(prepared splits: .*; views: trainval\)"):
        ds.load_split("trainval_vg")


def test_labels0_is_the_first_listed_human_answer():
    q = {"id": "1", "answers": ["Red.", "orange", "red", "blue"], "answer_scores": {"orange": 0.3, "red": 0.6}}
    assert first_listed_answer(q, {"orange", "red"}) == "red"  # first in annotation order, normalised
    assert first_listed_answer(q, {"orange"}) == "orange"  # not the most common
    assert first_listed_answer(q, {"green"}) is None
    samples = [
        {"id": "a", "answers": ["yes"] * 10, "answer_scores": {"yes": 1.0}},
        {"id": "b", "answers": ["kiwi"] * 10, "answer_scores": {"kiwi": 1.0}},  # no listed answer: dropped
        {"id": "c", "answers": ["no"] * 10, "answer_scores": {"no": 1.0}},
    ]
    assert select_ids(samples, 0.01, 0, "per_answer", answers=["yes", "no"]) == ["a", "c"]


def test_a_changed_part_redraws_a_saved_view_subset(tmp_path):
    raw, data = tmp_path / "coco", tmp_path / "data"
    layouts.make_coco(raw)
    prepare_dataset("coco", raw, data, options=FAST)
    ds = open_dataset("coco", data)
    fraction_subset(ds, "trainval", 0.5, seed=0)
    before = _saved(ds, "trainval", 0.5, 0)["manifest_sha256"]
    prepare_dataset("coco", raw, data, options={**FAST, "restval": "skip"})  # train changes, val does not
    ds = open_dataset("coco", data)
    assert ds.split_digest("trainval") != before
    sub = fraction_subset(ds, "trainval", 0.5, seed=0)
    assert len(sub) == 2 and _saved(ds, "trainval", 0.5, 0)["pool_size"] == 4


def test_catalog_tasks_train_on_the_pools_and_never_evaluate_a_trained_split(tmp_path):
    """`msvd-caption` and `vqav2` built from the catalog train on the reference's pools, and the
    periodic evaluation (default `eval.split: val`) moves to a split outside the training pool."""
    from uniperceiver.engine.periodic_eval import eval_split
    from uniperceiver.modeling.model_config import model_config
    from uniperceiver.tasks.catalog import build_task, task_config

    data = tmp_path / "data"
    fx = layouts.make_msvd_pairs(tmp_path / "msvd", clips=20, captions=15)
    prepare_dataset("msvd", tmp_path / "msvd", data, options={**FAST, "split_sizes": fx["split_sizes"]})
    layouts.make_vqav2(tmp_path / "coco")
    prepare_dataset("vqav2", tmp_path / "coco", data, options={**FAST, "min_count": "1", "minval_size": "1"})
    cfg = model_config("tiny")

    msvd = build_task(task_config("msvd-caption"), data, cfg)
    assert msvd.cfg.split == "trainval" and len(msvd.examples("trainval")) == fx["pairs"]
    assert eval_split(msvd, "val") == "test"  # val is training data here

    vqa = build_task(task_config("vqav2"), data, cfg)
    assert vqa.cfg.split == "trainval"  # no Visual Genome prepared: the fallback of trainval_vg|trainval
    assert eval_split(vqa, "val") is None  # val and its own eval split (val) are both trained on
    vqa_ft = build_task(task_config("vqav2", eval_split="minval"), data, cfg)
    assert eval_split(vqa_ft, "val") == "minval"
