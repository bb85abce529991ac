"""Text preparers: GLUE tasks from the official TSVs, and the streamed Books+Wiki corpus."""

from __future__ import annotations

import pytest
from fixtures import layouts

from uniperceiver.data.format import iter_corpus_lines, open_dataset, prepare_dataset
from uniperceiver.errors import DataError


@pytest.fixture(scope="module")
def glue_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue_data")
    return root, layouts.make_glue(root)


def test_glue_sst2(glue_root, tmp_path):
    root, expected = glue_root
    s = prepare_dataset("glue-sst2", root, tmp_path)
    assert s.splits == expected["sst2"]
    assert s.skipped == {"val": {"malformed_row": 1}}
    ds = open_dataset("glue-sst2", tmp_path)
    assert ds.classes == ["negative", "positive"] and ds.media_type == "text"
    train = ds.load_split("train")
    assert train[0] == {"id": "0", "text": "hide new secretions from the parental units", "label": 0}
    assert train[3]["text"] == '"a "quirky" film"'  # quotes kept verbatim (QUOTE_NONE)
    assert ds.load_split("test")[1] == {"id": "1", "text": "this film 's relationship ."}
    assert ds.meta["fewshot_rule"] == "per_label" and ds.meta["tasks"] == ["glue-sst2"]


def test_glue_cola_headerless_and_mnli_matched(glue_root, tmp_path):
    root, expected = glue_root
    assert prepare_dataset("glue-cola", root, tmp_path).splits == expected["cola"]
    cola = open_dataset("glue-cola", tmp_path).load_split("train")
    assert [x["label"] for x in cola] == [1, 1, 0] and cola[2]["text"] == "They drank the pub."
    assert prepare_dataset("glue-mnli", root, tmp_path).splits == expected["mnli"]
    mnli = open_dataset("glue-mnli", tmp_path)
    assert mnli.classes == ["contradiction", "neutral", "entailment"]
    assert [x["label"] for x in mnli.load_split("train")] == [1, 2, 0]
    assert mnli.load_split("val_mismatched")[0]["text_b"] == "Your contributions were of no help."


def test_glue_stsb_float_and_qqp_malformed_row(glue_root, tmp_path):
    root, expected = glue_root
    assert prepare_dataset("glue-stsb", root, tmp_path).splits == expected["stsb"]
    sts = open_dataset("glue-stsb", tmp_path)
    assert [x["label"] for x in sts.load_split("train")] == [5.0, 3.8] and sts.classes is None
    assert sts.meta["fewshot_rule"] == "per_item"
    s = prepare_dataset("glue-qqp", root / "QQP", tmp_path)  # a task folder as the root works too
    assert s.splits == expected["qqp"] and s.skipped == {"train": {"malformed_row": 1}}
    assert open_dataset("glue-qqp", tmp_path).load_split("train")[1]["id"] == "402555"
    with pytest.raises(DataError, match=r"RTE/train\.tsv: GLUE RTE not found"):
        prepare_dataset("glue-rte", root, tmp_path)


def test_bookswiki_streams_lines(tmp_path):
    raw, data = tmp_path / "bookswiki", tmp_path / "data"
    expected = layouts.make_bookswiki(raw)
    s = prepare_dataset("bookswiki", raw, data)
    assert s.splits == {"train": 2} and s.skipped == {"train": expected["skipped"]}
    ds = open_dataset("bookswiki", data)
    assert ds.load_split("train") == [
        {"id": "books/book1.txt", "text_file": "books/book1.txt", "lines": 3},
        {"id": "wiki/AA/wiki_00.txt", "text_file": "wiki/AA/wiki_00.txt", "lines": 3},
    ]
    assert list(iter_corpus_lines(ds, "train")) == expected["lines"]
    assert list(iter_corpus_lines(ds, "train", start_line=4)) == expected["lines"][4:]
    s2 = prepare_dataset("bookswiki", raw, data, options={"val_files": "1"})
    assert s2.splits == {"train": 1, "val": 1}
    assert list(iter_corpus_lines(open_dataset("bookswiki", data), "val")) == expected["lines"][3:]
