"""The prepared-dataset format: atomic manifests, meta checksums, safe media paths, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from uniperceiver.data.format import (
    ManifestWriter,
    PreparedDataset,
    PrepareSummary,
    iter_corpus_lines,
    open_dataset,
    prepare_dataset,
    resolve_data_dir,
    sort_splits,
    write_meta,
)
from uniperceiver.data.preparers import PREPARERS, get_preparer, preparer_module
from uniperceiver.errors import DataError, UpctlError


def _write(ds_dir: Path, raw: Path, splits: dict[str, list[dict]], **extra) -> PreparedDataset:
    for split, samples in splits.items():
        with ManifestWriter(ds_dir, split) as w:
            for s in samples:
                w.add(s)
    write_meta(
        ds_dir,
        {
            "dataset": ds_dir.name,
            "raw_root": str(raw),
            "splits": {k: len(v) for k, v in splits.items()},
            "targets": {"classes": ["cat", "dog"]},
            "media_type": "image",
            **extra,
        },
    )
    return open_dataset(ds_dir.name, ds_dir.parent)


def test_resolve_data_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("UPCTL_DATA", raising=False)
    assert resolve_data_dir(None) == tmp_path / "data"
    monkeypatch.setenv("UPCTL_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(None) == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_data_dir("rel") == tmp_path / "rel"


def test_manifest_writer_is_atomic_and_counts_skips(tmp_path):
    out = tmp_path / "ds"
    with ManifestWriter(out, "train") as w:
        w.add({"id": "a", "media": "x/a.jpg", "label": 0})
        w.add({"id": "a", "media": "x/a2.jpg", "label": 1})  # duplicate id -> counted, not written
        w.skip("missing_media", "x/b.jpg")
    assert w.count == 1 and w.skipped == {"duplicate_id": 1, "missing_media": 1}
    assert w.examples["missing_media"] == ["x/b.jpg"]
    # A finished split is staged; write_meta publishes all splits of a run together.
    assert not (out / "train.jsonl").exists() and (out / ".train.jsonl.staged").is_file()
    write_meta(out, {"dataset": "ds", "raw_root": str(tmp_path), "splits": {"train": 1}})
    before = (out / "train.jsonl").read_bytes()
    assert json.loads(before) == {"id": "a", "label": 0, "media": "x/a.jpg"}

    with pytest.raises(RuntimeError):
        with ManifestWriter(out, "train") as w:
            w.add({"id": "z", "media": "z.jpg"})
            raise RuntimeError("interrupted")
    assert (out / "train.jsonl").read_bytes() == before  # the old manifest survives
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.jsonl"]  # no temp file left behind

    with pytest.raises(DataError, match="escapes"):
        with ManifestWriter(out, "val") as w:
            w.add({"id": "e", "media": "../outside.jpg"})
    assert not (out / "val.jsonl").exists()
    with pytest.raises(DataError, match="invalid split"):
        ManifestWriter(out, "../x")


def test_meta_checksums_and_read_side(tmp_path):
    raw = tmp_path / "raw"
    ds = _write(
        tmp_path / "data" / "toy",
        raw,
        {
            "test": [{"id": "t1", "media": "b.jpg", "label": 1}],
            "train": [{"id": "1", "media": "a/1.jpg", "label": 0}, {"id": "2", "media": "a/2.jpg", "label": 1}],
        },
    )
    assert ds.splits == ["train", "test"]
    assert ds.classes == ["cat", "dog"] and ds.answers is None
    assert ds.raw_root == raw
    meta = json.loads((ds.root / "meta.json").read_text())
    assert meta["format_version"] == 1 and set(meta["manifest_sha256"]) == {"train", "test"}
    assert [s["id"] for s in ds.samples("train")] == ["1", "2"]
    assert ds.media_path(ds.load_split("train")[0]) == raw / "a" / "1.jpg"
    ds.verify()
    (ds.root / "train.jsonl").write_text('{"id": "1", "media": "a/1.jpg", "label": 1}\n')
    with pytest.raises(DataError, match="does not match meta.json"):
        ds.verify()
    with pytest.raises(DataError, match="no split 'val'.*train, test"):
        list(ds.samples("val"))


def test_malformed_manifest_line_names_file_and_line(tmp_path):
    ds = _write(tmp_path / "data" / "toy", tmp_path, {"train": [{"id": "1"}, {"id": "2"}]})
    (ds.root / "train.jsonl").write_text('{"id": "1"}\n{"id": 2,,}\n')
    it = ds.samples("train")
    assert next(it) == {"id": "1"}
    with pytest.raises(DataError, match=r"train\.jsonl:2: malformed JSON"):
        next(it)


def test_media_path_refuses_escapes(tmp_path):
    ds = _write(tmp_path / "data" / "toy", tmp_path / "raw", {"train": [{"id": "1", "media": "a.jpg"}]})
    for bad in ("../etc/passwd", "a/../../x.jpg", "/etc/passwd"):
        with pytest.raises(DataError, match="escapes|absolute"):
            ds.media_path({"id": "x", "media": bad})
    (ds.root / "train.jsonl").write_text('{"id": "1", "media": "../../secret.jpg"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl:1: media path '../../secret.jpg' escapes"):
        list(ds.samples("train"))


def test_open_dataset_errors(tmp_path):
    with pytest.raises(DataError, match=r"dataset 'coco' is not prepared under .*: run `upctl prepare coco` first"):
        open_dataset("coco", tmp_path)
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "meta.json").write_text('{"raw_root": 1,')
    with pytest.raises(DataError, match=r"meta\.json:1: malformed JSON"):
        open_dataset("coco", tmp_path)


def test_iter_corpus_lines_resumes_across_files(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text("one\n\ntwo\n")
    (raw / "b.txt").write_text("three\nfour\n  \nfive\n")
    ds = _write(
        tmp_path / "data" / "corpus",
        raw,
        {
            "train": [
                {"id": "a.txt", "text_file": "a.txt", "lines": 2},
                {"id": "b.txt", "text_file": "b.txt", "lines": 3},
            ]
        },
    )
    assert list(iter_corpus_lines(ds, "train")) == ["one", "two", "three", "four", "five"]
    assert list(iter_corpus_lines(ds, "train", start_line=1)) == ["two", "three", "four", "five"]
    assert list(iter_corpus_lines(ds, "train", start_line=3)) == ["four", "five"]
    assert list(iter_corpus_lines(ds, "train", start_line=5)) == []


def test_registry_and_summary():
    # one table row per dataset: a module of its own, or a family module and the variant it serves
    assert PREPARERS["mini"] == ("mini", None) and PREPARERS["glue-sst2"] == ("_glue", "sst2")
    assert preparer_module("coco") == "uniperceiver.data.preparers._karpathy"
    for name in PREPARERS:  # every row resolves to a prepare(raw_root, out_dir, ...) callable
        assert callable(get_preparer(name)), name
    assert get_preparer("kinetics700").args == ("kinetics700",)
    with pytest.raises(UpctlError, match="unknown dataset 'cocoa'; known datasets: .*coco.*glue-sst2"):
        get_preparer("cocoa")
    s = PrepareSummary(dataset="x", splits={"train": 2}, skipped={"train": {"missing_media": 1}}, missing_media=1)
    d = s.to_dict()
    assert d["splits"] == {"train": 2} and d["missing_media"] == 1 and d["dataset"] == "x"
    assert sort_splits(["test", "b", "train", "a", "val"]) == ["train", "val", "test", "a", "b"]


def test_prepare_dataset_missing_root_is_one_clear_line(tmp_path):
    with pytest.raises(DataError) as exc:
        prepare_dataset("coco", tmp_path / "nope", tmp_path / "data")
    msg = str(exc.value)
    assert "\n" not in msg and str(tmp_path / "nope") in msg and "dataset_coco.json" in msg


def test_views_read_their_parts_without_copying_them(tmp_path):
    img = {"media": "a.jpg", "media_type": "image"}
    splits = {
        "train": [{"id": "t1", "texts": ["a", "b"], **img}, {"id": "t2", "texts": ["c"], **img}],
        "val": [{"id": "v1", "texts": ["d", "e"], **img}, {"id": "v2", "texts": ["f"], **img}],
        "minval": [{"id": "v2", "texts": ["f"], **img}],
    }
    views = {
        "pairs": {"parts": ["train", "val"], "unit": "pair", "num_samples": 6},
        "held": {"parts": ["train", "val"], "exclude": "minval", "unit": "sample", "num_samples": 3},
        "odd": {"parts": ["train"], "unit": "word", "num_samples": 0},
    }
    ds = _write(tmp_path / "ds", tmp_path, splits, views=views)
    assert ds.splits == ["train", "val", "minval"] and set(ds.views) == {"pairs", "held", "odd"}
    pairs = ds.load_split("pairs")
    assert [(x["id"], x["texts"], x["parent_id"]) for x in pairs] == [
        ("t1#0", ["a"], "t1"), ("t1#1", ["b"], "t1"), ("t2#0", ["c"], "t2"),
        ("v1#0", ["d"], "v1"), ("v1#1", ["e"], "v1"), ("v2#0", ["f"], "v2"),
    ]
    assert [x["id"] for x in ds.load_split("held")] == ["t1", "t2", "v1"] and ds.num_samples("held") == 3
    assert ds.has_split("held") and ds.split_parts("held") == ["train", "val"] and ds.split_parts("val") == ["val"]
    with pytest.raises(DataError, match="'pairs' is a view of"):
        ds.manifest_path("pairs")
    with pytest.raises(DataError, match="view 'odd' has unit 'word'"):
        ds.load_split("odd")
    # the digest of a view follows its parts: an edited part gives another digest
    before = ds.split_digest("held")
    assert before != ds.split_digest("pairs")
    splits["val"][0]["texts"] = ["changed"]
    ds = _write(tmp_path / "ds", tmp_path, splits, views=views)
    assert ds.split_digest("held") != before
